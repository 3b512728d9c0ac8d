"""Loss forward + backward time and peak memory against open_clip's ClipLoss and SigLipLoss.

``python -m benchmarks.loss_speed`` measures every variant at B in {1024, 4096, 16384}, d = 512,
fp32 on the CPU, and writes ``results/benchmarks/loss_speed.{json,md,png}``.

Time: wall-clock of one call of ``loss(x, y, s[, b]).backward()`` (features and scale require
grad), minimum over rounds after a warm-up. Peak memory: every (variant, B) runs once more in a
fresh child process, after a warm-up at B = 64; the child resets the kernel's RSS high-water mark
(``/proc/self/clear_refs``), runs forward + backward once, and reports ``VmHWM - VmRSS`` at the
reset: the largest resident memory the call added. (tracemalloc does not see torch's allocations;
on Linux glibc serves these large tensors with mmap and returns them on free, so the RSS peak is
the peak of live tensor bytes plus allocator slack.)
"""

from __future__ import annotations

import argparse
import json
from typing import Callable, Optional

import torch

SIZES = (1024, 4096, 16384)
DIM = 512
CHUNK = 256  # amortize.kernels.DEFAULT_CHUNK_SIZE (the results on disk were measured with 1024)
VARIANTS = (
    "open_clip ClipLoss",
    "open_clip SigLipLoss",
    "infonce",
    "infonce chunked",
    "sigmoid",
    "sigmoid chunked",
    "amortized (functional dense)",
    "amortized",
    "amortized chunked",
)
CHUNK_SWEEP = (256, 1024, 4096)  # extra amortized chunk sizes at the largest B


def make_loss(variant: str, B: int) -> Callable:
    """A callable ``(x, y, s, b) -> loss`` for one variant (``amortized chunked=N`` sets N)."""
    from amortize import functional as F
    from amortize.losses import ContrastiveLoss

    if variant == "open_clip ClipLoss":
        from open_clip.loss import ClipLoss

        fn = ClipLoss()
        return lambda x, y, s, b: fn(x, y, s)
    if variant == "open_clip SigLipLoss":
        from open_clip.loss import SigLipLoss

        fn = SigLipLoss()
        return lambda x, y, s, b: fn(x, y, s, b)
    if variant.startswith("infonce"):
        cs = CHUNK if "chunked" in variant else None
        return lambda x, y, s, b: F.infonce_loss(x, y, s, chunk_size=cs)
    if variant.startswith("sigmoid"):
        cs = CHUNK if "chunked" in variant else None
        return lambda x, y, s, b: F.sigmoid_loss(x, y, s, b, chunk_size=cs)
    if variant == "amortized (functional dense)":
        def fn(x, y, s, b):
            lz = F.log_partition(x, y, s, 0.0, 1e-3)
            return F.amortized_loss(x, y, s, lz[0], lz[1], 0.0, 1e-3)

        return fn
    if variant.startswith("amortized"):
        cs = None
        if "chunked" in variant:
            cs = int(variant.split("=")[1]) if "=" in variant else CHUNK
        mod = ContrastiveLoss("linearized", pos_weight=1e-3, chunk_size=cs)  # in-batch estimator
        return lambda x, y, s, b: mod(x, y, s)["loss"]
    raise ValueError(variant)


def inputs(B: int, d: int = DIM, seed: int = 0):
    """Unit features (B, d) with grad, a scale with grad (s = 1/0.07) and a SigLIP bias with grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=-1).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=-1).requires_grad_()
    s = torch.tensor(1 / 0.07, requires_grad=True)
    b = torch.tensor(-10.0, requires_grad=True)
    return x, y, s, b


def step_fn(variant: str, B: int) -> Callable[[], None]:
    """One forward + backward of ``variant`` at batch ``B`` on fixed inputs (grads reset each call)."""
    loss = make_loss(variant, B)
    x, y, s, b = inputs(B)

    def run():
        for t in (x, y, s, b):
            t.grad = None
        loss(x, y, s, b).backward()

    return run


def rounds_for(B: int) -> int:
    return 5 if B <= 1024 else 3 if B <= 4096 else 1


def child(variant: str, B: int) -> dict:
    """In a fresh process: the peak RSS added by one forward + backward (see the module docstring)."""
    from benchmarks.common import rss_peak_reset, rss_peak_since_reset

    step_fn(variant, 64)()
    run = step_fn(variant, B)
    base = rss_peak_reset()
    run()
    return {"variant": variant, "B": B, "peak_bytes": rss_peak_since_reset(base)}


def measure(variant: str, B: int, time_it: bool = True) -> dict:
    """Time in this process, peak memory in a child."""
    from benchmarks.common import peak_rss_in_child, time_call

    out = {"variant": variant, "B": B, "d": DIM}
    if time_it:
        out.update(time_call(step_fn(variant, B), rounds_for(B), warmup=1))
    out["peak_bytes"] = peak_rss_in_child("benchmarks.loss_speed", ["--child", variant, str(B)])["peak_bytes"]
    return out


def all_cases() -> list[tuple[str, int]]:
    cases = [(v, B) for B in SIZES for v in VARIANTS]
    cases += [(f"amortized chunked={c}", SIZES[-1]) for c in CHUNK_SWEEP if c != CHUNK]
    return cases


def report(results: list[dict]) -> dict:
    """Ratios for the targets, the JSON file, the markdown table and the plot."""
    from benchmarks.common import markdown_table, write_json

    by = {(r["variant"], r["B"]): r for r in results}
    targets = {}
    if ("amortized", 4096) in by and ("open_clip ClipLoss", 4096) in by:
        ratio = by[("amortized", 4096)]["min_s"] / by[("open_clip ClipLoss", 4096)]["min_s"]
        targets["amortized_vs_cliploss_time_B4096"] = {"value": ratio, "target": "<= 1.1", "met": ratio <= 1.1}
    big = SIZES[-1]
    if ("amortized chunked", big) in by and ("amortized", big) in by:
        ratio = by[("amortized chunked", big)]["peak_bytes"] / by[("amortized", big)]["peak_bytes"]
        targets[f"amortized_chunked_vs_dense_memory_B{big}"] = {"value": ratio, "target": "<= 0.1", "met": ratio <= 0.1}
        ratio_oc = by[("amortized chunked", big)]["peak_bytes"] / by[("open_clip ClipLoss", big)]["peak_bytes"]
        targets[f"amortized_chunked_vs_cliploss_memory_B{big}"] = {"value": ratio_oc, "target": "(info)", "met": True}
    rows = []
    for r in results:
        ref = by.get(("open_clip ClipLoss", r["B"]))
        rows.append([r["variant"], r["B"], r.get("min_s", float("nan")),
                     r["min_s"] / ref["min_s"] if ref and "min_s" in r else float("nan"),
                     r["peak_bytes"] / 2**20])
    table = markdown_table(["variant", "B", "fwd+bwd (s)", "time / ClipLoss", "peak memory (MiB)"], rows)
    write_json("loss_speed", {"dim": DIM, "chunk_size": CHUNK, "results": results, "targets": targets})
    from benchmarks.common import results_dir

    (results_dir("benchmarks") / "loss_speed.md").write_text(table)
    plot(results)
    return targets


def plot(results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import results_dir

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v in VARIANTS:
        pts = sorted((r["B"], r) for r in results if r["variant"] == v)
        if not pts:
            continue
        Bs = [p[0] for p in pts]
        axes[0].plot(Bs, [p[1]["min_s"] for p in pts], marker="o", label=v)
        axes[1].plot(Bs, [p[1]["peak_bytes"] / 2**20 for p in pts], marker="o", label=v)
    for ax, title in zip(axes, ("forward + backward time (s)", "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch B (d = 512, fp32, CPU)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results_dir("benchmarks") / "loss_speed.png", dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "B"), help="internal: peak memory of one case")
    p.add_argument("--sizes", type=int, nargs="*", default=None)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]))))
        return
    results = [measure(v, B) for v, B in all_cases() if a.sizes is None or B in a.sizes]
    print(json.dumps(report(results), indent=2))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""AmorLIP versus CLIP training-step time, memory and model FLOP utilisation on one GPU.

    python benchmarks/gpu_benchmark.py                      # ViT-B/32, batch 1024, bf16, cuda
    python benchmarks/gpu_benchmark.py --device cpu --model tiny --batch-size 8 --steps 2   # smoke mode

The model is ``amortize.models.build_model(--model)`` (open_clip's ``ViT-B-32`` by default, or any
name that function knows, such as our ``tiny``), untrained (nothing is downloaded), on random
images of the model's side (or ``--image-size``) and random texts of its context length. One step:
forward both towers (under bf16 autocast with ``--precision bf16``), the loss in fp32 (CLIP:
``ContrastiveLoss("infonce")``; AmorLIP: ``ContrastiveLoss("linearized")`` with an
:class:`~amortize.estimators.AmortizedEstimator`, the large recipe's settings: 3 inner Adam steps
every step, EMA every 2 steps, pos_weight 1e-3, rho rescaling), backward, gradient clipping at 1.0
and an AdamW step. Reported per method: median step time over ``--steps`` after ``--warmup`` steps,
peak allocated memory (``torch.cuda.max_memory_allocated``; RSS high-water mark on the CPU), and
MFU = FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and
convolutions, forward and backward) / step time / ``--peak-tflops`` (H200 dense bf16: 989). With the
defaults it runs in about two minutes on an H200 (well under ten).

``--precision`` is one of ``PRECISIONS``: ``auto`` (the default) is bf16 on CUDA and fp32 on any
other device. ``--precision bf16 --device cpu`` is allowed but slow: CPUs without native bf16
instructions (no AVX512_BF16 or AMX, e.g. many AMD EPYC and older Intel parts) emulate it, and a
ViT-B/32 step then takes minutes instead of seconds.

    python benchmarks/gpu_benchmark.py --microbatch-sizes 1024,256,64,16   # memory against microbatch size

Microbatch mode (``--microbatch-sizes``): only AmorLIP, once per size, with the exact gradient cache
of :mod:`amortize.gradcache` (a size of at least the batch is the step without it); reports the
peak memory and median step time of each size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amortize.estimators import AmortizedEstimator  # noqa: E402
from amortize.losses import ContrastiveLoss  # noqa: E402
from amortize.models import build_model  # noqa: E402

PRECISIONS = ("auto", "bf16", "fp32")
"""Values of ``--precision``: ``auto`` is bf16 on CUDA and fp32 elsewhere."""


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses: ``bf16`` or ``fp32`` (``auto``: bf16 on CUDA, fp32 on other devices).

    Raises:
        ValueError: for a precision not in :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def build(method: str, args, device: torch.device):
    """One training step of ``method`` (``clip`` or ``amorlip``) as a closure over its model and data,
    and a dict describing the inputs (``image_size``, ``context_length``, ``parameters``)."""
    torch.manual_seed(0)
    model = build_model(args.model, image_size=args.image_size).to(device)
    dim = model.embed_dim
    if method == "clip":
        loss_fn = ContrastiveLoss("infonce", chunk_size=args.chunk_size)
    else:
        est = AmortizedEstimator(dim=dim, amortizer={"name": "residual_mlp", "width_factor": 1.0}, inner_steps=3, update_every=1,
                                 ema_decay=0.92, ema_every=2)
        loss_fn = ContrastiveLoss("linearized", estimator=est, pos_weight=1e-3, rho=8.5, chunk_size=args.chunk_size)
        loss_fn.start_epoch(1, 33)  # past epoch 0: the previous-epoch network is blended in
    loss_fn = loss_fn.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    size = model.image_size
    g = torch.Generator(device="cpu").manual_seed(1)
    images = torch.randn(args.batch_size, 3, size, size, generator=g).to(device)
    tokens = torch.randint(1, 49000, (args.batch_size, model.context_length), generator=g).to(device)
    amp = args.precision == "bf16"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            x = model.encode_image(images, normalize=True)
            y = model.encode_text(tokens, normalize=True)
        out = loss_fn(x.float(), y.float(), model.logit_scale.exp().float())
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)

    info = {"image_size": size, "context_length": model.context_length,
            "parameters": sum(p.numel() for p in model.parameters())}
    return step, info


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def measure(method: str, args, device) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    step, info = build(method, args, device)
    for _ in range(args.warmup):
        step()
    _sync(device)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "method": method,
        **info,
        "median_step_s": med,
        "times_s": times,
        "peak_memory_bytes": _peak_bytes(device),
        "flops_per_step": flops,
        "mfu": flops / med / (args.peak_tflops * 1e12),
    }


def measure_microbatch(microbatch: int, args, device) -> dict:
    """AmorLIP with gradient-cached microbatches of ``microbatch`` rows: peak memory and median step time."""
    from amortize.gradcache import gradient_cached_backward

    torch.manual_seed(0)
    model = build_model(args.model, image_size=args.image_size).to(device)
    est = AmortizedEstimator(dim=model.embed_dim, amortizer={"name": "residual_mlp", "width_factor": 1.0},
                             inner_steps=3, update_every=1, ema_decay=0.92, ema_every=2)
    loss_fn = ContrastiveLoss("linearized", estimator=est, pos_weight=1e-3, rho=8.5,
                              chunk_size=args.chunk_size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    size = model.image_size
    g = torch.Generator(device="cpu").manual_seed(1)
    batch = {"image": torch.randn(args.batch_size, 3, size, size, generator=g).to(device),
             "text": torch.randint(1, 49000, (args.batch_size, model.context_length), generator=g).to(device)}

    def encode(b):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            x = model.encode_image(b["image"], normalize=True)
            y = model.encode_text(b["text"], normalize=True)
        return x.float(), y.float(), model.logit_scale.exp().float()

    def step():
        opt.zero_grad(set_to_none=True)
        gradient_cached_backward(encode, batch, microbatch, lambda x, y, s: loss_fn(x, y, s))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(max(1, args.steps)):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"microbatch": min(microbatch, args.batch_size), "median_step_s": statistics.median(times),
            "times_s": times, "peak_memory_bytes": _peak_bytes(device)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="ViT-B-32",
                   help="a name amortize.models.build_model knows: ViT-B-32 (default), tiny, cpu-small, RN50 ...")
    p.add_argument("--image-size", type=int, default=None, help="input side (default: the model's)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 on cuda, fp32 elsewhere; bf16 on a CPU without native bf16 "
                        "is emulated and very slow")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device peak (H200 dense bf16: 989)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--microbatch-sizes", default=None,
                   help="comma-separated microbatch sizes: run only the gradient-cache memory sweep (AmorLIP)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.precision = resolve_precision(args.precision, device)
    if args.precision == "bf16" and device.type != "cuda":
        print(f"note: bf16 autocast on {device.type} is emulated on CPUs without native bf16 and can be very slow",
              file=sys.stderr)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    if args.microbatch_sizes:
        rows = [measure_microbatch(int(mb), args, device) for mb in args.microbatch_sizes.split(",")]
        for r in rows:
            print(f"microbatch {r['microbatch']:6d}   step {1000 * r['median_step_s']:9.1f} ms"
                  f"   peak {r['peak_memory_bytes'] / 2**30:6.2f} GiB")
        summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "model": args.model, "batch_size": args.batch_size, "precision": args.precision,
                   "microbatch": rows, "wall_s": time.perf_counter() - t0}
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    results = [measure(m, args, device) for m in ("clip", "amorlip")]
    clip, amor = results
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": args.model,
        "image_size": results[0]["image_size"],
        "batch_size": args.batch_size,
        "precision": args.precision,
        "results": results,
        "step_overhead": amor["median_step_s"] / clip["median_step_s"] - 1,
        "memory_overhead": amor["peak_memory_bytes"] / max(clip["peak_memory_bytes"], 1) - 1,
        "wall_s": time.perf_counter() - t0,
    }
    for r in results:
        print(f"{r['method']:8s} step {1000 * r['median_step_s']:9.1f} ms   peak {r['peak_memory_bytes'] / 2**30:6.2f} GiB"
              f"   {r['flops_per_step'] / 1e12:7.2f} TFLOP/step   MFU {100 * r['mfu']:5.1f}%")
    print(f"AmorLIP step overhead {100 * summary['step_overhead']:+.2f}%, memory {100 * summary['memory_overhead']:+.2f}%")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()

"""Accuracy of the partition-function estimators on a fixed pool with a known exact log partition.

``python -m benchmarks.estimator_accuracy`` writes ``results/benchmarks/estimator_accuracy.{json,md,png}``.

The pool: P = 8192 pairs of unit embeddings in d = 64 drawn around 32 cluster centres (so that
``log Z`` varies from sample to sample), texts correlated with their images, inverse
temperature s = 20. The quantity estimated is the per-sample log partition in MEAN form,
``log Z(x_i) = log mean_{j != i} exp(s <x_i, y_j>)`` (and the same for texts), which
is exact and computable here. Each estimator sees the same stream of random batches of size B for
``max(3 epochs, 200 steps)``:

* in-batch (CLIP): ``logsumexp_{j != i} S_ij - log(B - 1)`` on the sample's own batch;
* moving average (SogCLR, gamma = 0.9): the per-sample table after the stream;
* amortized (AmorLIP): :class:`~amortize.estimators.AmortizedEstimator` fitted online to the
  in-batch targets (3 Adam steps per batch, lr 5e-3, EMA 0.9), then its EMA network's prediction;
  with the log-L2 Stage I objective (default), the KL f-divergence and the reverse KL
  (``f(t) = t - 1 - log t``, whose minimiser over random batches is the mean partition sum);
* NeuCLIP: the ``neuclip`` preset with m = 256 prototypes (the small-batch recipe's) (restarted from the batch's embeddings
  at step 0, ``short_batch = partial`` when m > B), 10 AdaGrad steps (lr 0.05) per batch on
  ``exp(t - alpha) + alpha``, then its online network's prediction. Its network reads the scale
  and the positive score; ``num_negatives = 1`` puts its output on this benchmark's mean scale.

RMSE over all pool samples (both modalities), in nats.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Optional

import torch

from amortize import functional as F
from amortize.estimators import AmortizedEstimator, MovingAverageEstimator, build_estimator

SIZES = (32, 128, 512, 2048)
POOL, DIM, SCALE, CLUSTERS = 4096, 64, 20.0, 32
PROTOTYPES = 256
# the NeuCLIP network reads the scale and the positive score; one "negative" puts it on the mean scale
NEUCLIP_INPUTS = {"scale": torch.tensor(SCALE), "bias": None, "num_negatives": 1.0, "local_rows": False}


def pool(seed: int = 0):
    """(x, y, exact log Z of x, exact log Z of y) for the fixed pool."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(CLUSTERS, DIM, generator=g), dim=-1)
    which = torch.randint(0, CLUSTERS, (POOL,), generator=g)
    spread = 0.3 + 0.7 * torch.rand(CLUSTERS, generator=g)  # tight and loose clusters
    x = torch.nn.functional.normalize(
        centres[which] + spread[which, None] * torch.randn(POOL, DIM, generator=g) / math.sqrt(DIM) * 3, dim=-1)
    y = torch.nn.functional.normalize(x + 0.5 * torch.randn(POOL, DIM, generator=g) / math.sqrt(DIM) * 3, dim=-1)
    S = SCALE * x @ y.T
    S.fill_diagonal_(-math.inf)  # the negatives of each sample: every other sample of the pool
    return x, y, torch.logsumexp(S, 1) - math.log(POOL - 1), torch.logsumexp(S, 0) - math.log(POOL - 1)


def _batch_targets(xb, yb):
    B = xb.shape[0]
    lzx, lzy = F.log_partition(xb, yb, SCALE, 0.0, pos_weight=0.0)
    return lzx - math.log(B - 1), lzy - math.log(B - 1)


def run(B: int, seed: int = 0) -> dict:
    """RMSE (nats) of the three estimators at batch ``B``."""
    x, y, zx, zy = pool(seed)
    steps = max(3 * POOL // B, 150)
    g = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed)
    ma = MovingAverageEstimator(POOL, gamma=0.9)
    ams = {
        kind: AmortizedEstimator(
            dim=DIM, amortizer={"name": "residual_mlp", "init_log_z": float(zx.mean())}, objective=kind, lr=5e-3, inner_steps=3,
            update_every=1, ema_decay=0.9, ema_every=1, beta=0.0, normalizer="ema_target", reinit="never",
        )
        for kind in ("log_l2", "kl", "reverse_kl")
    }
    for am in ams.values():
        am.start_epoch(0, 1)
    neu = build_estimator("neuclip", dim=DIM, num_prototypes=PROTOTYPES, seed=seed)
    sq_in_batch, n_in_batch = 0.0, 0
    order = torch.randperm(POOL, generator=g)
    pos = 0
    for _ in range(steps):
        if pos + B > POOL:
            order, pos = torch.randperm(POOL, generator=g), 0
        idx = order[pos : pos + B]
        pos += B
        tx, ty = _batch_targets(x[idx], y[idx])
        sq_in_batch += float((tx - zx[idx]).square().sum() + (ty - zy[idx]).square().sum())
        n_in_batch += 2 * B
        ma(x[idx], y[idx], tx, ty, idx)
        for am in ams.values():
            am(x[idx], y[idx], tx, ty, idx)
        neu(x[idx], y[idx], tx, ty, idx, **NEUCLIP_INPUTS)
    seen = ~torch.isneginf(ma.log_u_x)
    ma_sq = (ma.log_u_x[seen] - zx[seen]).square().sum() + (ma.log_u_y[seen] - zy[seen]).square().sum()
    am_rmse = {}
    for kind, am in ams.items():
        am.eval()
        with torch.no_grad():
            est = am(x, y, zx, zy, None)
        am_sq = (est.log_norm_x - zx).square().sum() + (est.log_norm_y - zy).square().sum()
        am_rmse[kind] = math.sqrt(float(am_sq) / (2 * POOL))
    neu.eval()
    with torch.no_grad():
        est = neu(x, y, zx, zy, None, **NEUCLIP_INPUTS)
    neu_rmse = math.sqrt(float((est.log_norm_x - zx).square().sum() + (est.log_norm_y - zy).square().sum()) / (2 * POOL))
    return {
        "B": B,
        "steps": steps,
        "rmse": {
            "in_batch": math.sqrt(sq_in_batch / n_in_batch),
            "moving_average": math.sqrt(float(ma_sq) / (2 * int(seen.sum()))),
            "amortized": am_rmse["log_l2"],
            "amortized_kl": am_rmse["kl"],
            "amortized_reverse_kl": am_rmse["reverse_kl"],
            "neuclip": neu_rmse,
        },
        "log_z_std": float(torch.cat([zx, zy]).std()),
    }


def report(results: list[dict]) -> dict:
    from benchmarks.common import markdown_table, results_dir, write_json

    targets = {}
    small = [r for r in results if r["B"] == 32]
    if small:
        r = small[0]["rmse"]
        ratio = r["amortized"] / r["in_batch"]
        targets["amortized_vs_in_batch_rmse_B32"] = {"value": ratio, "target": "<= 0.5", "met": ratio <= 0.5}
        ratio = r["amortized_reverse_kl"] / r["in_batch"]
        targets["amortized_reverse_kl_vs_in_batch_rmse_B32"] = {"value": ratio, "target": "<= 0.5",
                                                                 "met": ratio <= 0.5}
    rows = [[r["B"], r["steps"], r["rmse"]["in_batch"], r["rmse"]["moving_average"], r["rmse"]["amortized"],
             r["rmse"]["amortized_kl"], r["rmse"]["amortized_reverse_kl"], r["rmse"]["neuclip"]] for r in results]
    table = markdown_table(["B", "steps", "in-batch RMSE", "moving-average RMSE", "amortized (log-L2) RMSE",
                            "amortized (KL) RMSE", "amortized (reverse KL) RMSE", "NeuCLIP RMSE"], rows)
    write_json("estimator_accuracy", {"pool": POOL, "dim": DIM, "scale": SCALE, "results": results,
                                      "targets": targets})
    (results_dir("benchmarks") / "estimator_accuracy.md").write_text(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for k, label in (("in_batch", "in-batch (CLIP)"), ("moving_average", "moving average (SogCLR)"),
                     ("amortized", "amortized log-L2 (AmorLIP)"), ("amortized_kl", "amortized KL"),
                     ("amortized_reverse_kl", "amortized reverse KL"), ("neuclip", "NeuCLIP (prototypes)")):
        ax.plot([r["B"] for r in results], [r["rmse"][k] for r in results], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch B")
    ax.set_ylabel("RMSE of log Z (nats)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(results_dir("benchmarks") / "estimator_accuracy.png", dpi=110)
    plt.close(fig)
    return targets


def main(argv: Optional[list[str]] = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    print(json.dumps(report([run(B) for B in SIZES]), indent=2))


if __name__ == "__main__":
    main()

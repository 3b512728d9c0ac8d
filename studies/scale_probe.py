"""The first epochs of transfer-suite runs: where a method's logit scale goes before it settles.

A run of the suite whose scale runs to the clamp does so from its first epochs (NeuCLIP with its
own temperature gradient: docs/differences.md#neuclip). This probe trains the first ``--epochs``
epochs of a suite run (the same schedule, data order and seed as the whole run, which it
reproduces bit for bit) for each variant, on the validation split's runs (a run's training does
not depend on the split it is evaluated on), and records the scale and the normaliser's error
per epoch in ``results/studies/scale_probe.runs.jsonl``::

    python -m studies.scale_probe --method neuclip --cells emoji:2 glyphs:1 --epochs 12 \\
        --variants robust_rho_2 robust_rho_1

Each cell runs at the (lr, beta2, temperature lr) the suite's lr stage chose for the method at that batch.
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor

import torch

from studies.transfer import CONVERGED_EPOCHS, OUT, VARIANTS, Run, load_rows, train, variant_run

__all__ = ["probe"]

PATH = OUT / "scale_probe.runs.jsonl"


def probe(args: tuple) -> dict:
    """One probe: ``(dataset, seed, method, batch, lr, beta2, logit_scale_lr, variant, epochs, suite_epochs)`` -> its row."""
    dataset, seed, method, batch, lr, beta2, scale_lr, variant, epochs, suite_epochs = args
    from studies.suite_data import build

    data = build(dataset)
    spe = len(data.splits["train"]) // batch
    run = Run(dataset, method, batch, seed, "val", lr=lr, epochs=suite_epochs, variant=variant,
              overrides=VARIANTS[variant] if variant else {}, max_steps=epochs * spe, beta2=beta2,
              logit_scale_lr=scale_lr)
    row = train(run, data)
    log = row["epochs_log"]
    return {"key": run.key(), "probe_epochs": epochs, "dataset": dataset, "seed": seed, "method": method,
            "batch": batch, "variant": variant, "lr": row["lr"], "beta2": row["beta2"],
            "logit_scale_lr": run.scale_lr(),
            "scale": [round(e["scale"], 2) for e in log],
            "norm_err": {e["epoch"]: round(e["norm_err"], 3) for e in log if "norm_err" in e},
            "warnings": len(row["warnings"]), "quality": row["quality"], "wall_s": row["wall_s"]}


def _worker_init() -> None:  # one thread each, behind interactive work, as the suite's runs
    torch.set_num_threads(1)
    os.nice(5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="neuclip")
    p.add_argument("--cells", nargs="+", default=["emoji:2", "glyphs:1"], help="dataset:seed")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=12, help="epochs probed (of the suite's converged run)")
    p.add_argument("--variants", nargs="+", default=["robust_rho_2", "robust_rho_1"])
    p.add_argument("--lr-from", default="converged",
                   help="the suite run whose lr stage chose (lr, beta2, logit_scale_lr)")
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args()
    lr_rows = list(load_rows(OUT / f"{a.lr_from}_lr.runs.jsonl").values())
    jobs = []
    for v in a.variants:
        for cell in a.cells:
            dataset, seed = cell.split(":")
            suite_epochs = CONVERGED_EPOCHS[dataset]
            run = variant_run(lr_rows, dataset, a.method, a.batch, int(seed), "val", suite_epochs, v)
            jobs.append((dataset, run.seed, a.method, a.batch, run.lr, run.beta2, run.logit_scale_lr, v, a.epochs,
                         suite_epochs))
    with ProcessPoolExecutor(a.jobs, initializer=_worker_init) as ex:
        for row in ex.map(probe, jobs):
            print(f"{row['dataset']:7s} seed {row['seed']} {row['variant']:32s} scale {row['scale'][0]:.1f} -> "
                  f"{row['scale'][-1]:.1f}  err {row['norm_err']}", flush=True)
            with PATH.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

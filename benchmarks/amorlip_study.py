"""Study of AmorLIP's estimator settings in the small-batch regime, on the VALIDATION split only.

    python -m benchmarks.amorlip_study                       # every variant, seed 100, B = 16
    python -m benchmarks.amorlip_study --seeds 100 101 --variants default reverse_kl ...
    python -m benchmarks.amorlip_study --list                # the variants and their overrides

Each variant changes one group of options of the benchmark's AmorLIP defaults
(:func:`benchmarks.small_batch.amorlip_options`: the default recipe's estimator with the beta
warm-up scaled to the run length); CLIP at the same seeds, at the same batch and at B=256, is the
reference (``--references clip sogclr fastclip`` adds others). Settings are chosen here and confirmed on the held-out ``test`` split with
fresh seeds by ``python -m benchmarks.small_batch``. Results: ``benchmarks/amorlip_study.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from benchmarks.small_batch import HERE, RunConfig, markdown, run_all, summarise

VARIANTS: dict[str, dict] = {
    # in the order they run (most informative first, so that a cut-short study still says most)
    "default": {},
    # Stage I objective (the estimator benchmark found reverse KL 0.40x the in-batch error, log-L2 0.64x)
    "reverse_kl": {"objective": "reverse_kl"},
    # encoder normaliser: the paper's EMA network instead of the code's blend with the batch
    "ema_target": {"normalizer": "ema_target"},
    # concepts pages: blend the amortizer with the in-batch estimate by their variances
    "variance_blend": {"estimator": "variance_blend"},
    # the temperature: CLIP does not rescale
    "no_rho": {"rho": None},
    # re-initialisation
    "reinit_never": {"reinit": "never"},
    # inner optimisation
    "inner_10": {"inner_steps": 10},
    "lr_2e-2": {"lr": 0.02},
    "kl": {"objective": "kl"},
    "js": {"objective": "js"},
    # cadence
    "update_every_4": {"update_every": 4},
    "ema_slow": {"ema_every": 1, "ema_decay": 0.99},
    # network
    "init_log_z_0": {"init_log_z": 0.0},
    "width_1.0": {"width_factor": 1.0},
    # previous-epoch blending
    "beta_0.5": {"beta": {"name": "beta_warmup", "final": 0.5, "warmup_epochs": 5}},
    "beta_0.95": {"beta": {"name": "beta_warmup", "final": 0.95, "warmup_epochs": 5}},
    "inner_1": {"inner_steps": 1},
    # control (not a setting to choose): the same objective, pos_weight and rho with in-batch sums
    "in_batch_control": {"estimator": "in_batch"},
    "lr_1e-3": {"lr": 0.001},
    "width_0.25": {"width_factor": 0.25},
}

REFERENCES = ("clip",)


def configs(variants, seeds, batch: int, epochs: int, references=REFERENCES, large: Optional[int] = 256):
    """The study's run configurations (validation split)."""
    cfgs = []
    for s in seeds:  # CLIP at the large batch is cheap: it runs beside the first small-batch run
        cfgs += [RunConfig(m, batch, s, epochs=epochs, split="val") for m in references]
        if large:
            cfgs.insert(1, RunConfig("clip", large, s, epochs=epochs, split="val"))
    cfgs += [RunConfig("amorlip", batch, s, epochs=epochs, split="val", amorlip=VARIANTS[v] or None,
                       tag=f"amorlip[{v}]") for v in variants for s in seeds]
    return cfgs


def main(argv: Optional[list[str]] = None) -> None:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="*", default=[100])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="amorlip_study")
    p.add_argument("--references", nargs="*", default=list(REFERENCES),
                   help="methods run at the same seeds and batch for comparison (CLIP also at B=256)")
    p.add_argument("--list", action="store_true")
    a = p.parse_args(argv)
    if a.list:
        for k, v in VARIANTS.items():
            print(f"{k:16s} {v}")
        return
    unknown = sorted(set(a.variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    cfgs = configs(a.variants, a.seeds, a.batch, a.epochs, references=a.references)
    rows = run_all(cfgs, jobs=a.jobs, jsonl=HERE / f"{a.out}.runs.jsonl")
    summary = summarise(rows)
    cmd = "python -m benchmarks.amorlip_study " + " ".join(argv if argv is not None else sys.argv[1:])
    from benchmarks.common import write_json

    write_json(a.out, {"command": cmd, "split": "val", "summary": summary, "rows": rows})
    md = markdown(summary, f"`{cmd}` ({a.epochs} epochs, split `val`)")
    (HERE / f"{a.out}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

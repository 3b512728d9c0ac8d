"""Study of AmorLIP's estimator settings in the small-batch regime, on the VALIDATION split only.

    python -m studies.amorlip_study                       # every variant, seed 100, B = 16
    python -m studies.amorlip_study --seeds 100 101 --variants default reverse_kl ...
    python -m studies.amorlip_study --list                # the variants and their overrides

Each variant changes one group of options of the benchmark's AmorLIP defaults
(:func:`studies.small_batch.amorlip_options`: the default recipe's estimator with the beta
warm-up scaled to the run length); CLIP at the same seeds, at the same batch and at B=256, is the
reference (``--references clip sogclr fastclip`` adds others). Settings are chosen here and confirmed on the held-out ``test`` split with
fresh seeds by ``python -m studies.small_batch``. Results: ``results/studies/amorlip_study.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from studies.amorlip_variants import VARIANTS
from studies.small_batch import OUT, RunConfig, markdown, run_all, summarise

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
    rows = run_all(cfgs, jobs=a.jobs, jsonl=OUT / f"{a.out}.runs.jsonl")
    summary = summarise(rows)
    cmd = "python -m studies.amorlip_study " + " ".join(argv if argv is not None else sys.argv[1:])
    from benchmarks.common import write_json

    write_json(a.out, {"command": cmd, "split": "val", "summary": summary, "rows": rows}, "studies")
    md = markdown(summary, f"`{cmd}` ({a.epochs} epochs, split `val`)")
    (OUT / f"{a.out}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

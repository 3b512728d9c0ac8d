"""The ``amortize`` command line.

::

    amortize train RECIPE.yaml [key.sub=value ...] [--dry-run]
    amortize eval CHECKPOINT [--json] [--tasks default | NAME ... | datacomp] [--datacomp-root DIR]

Several processes and nodes go through Composer's launcher, which runs this module once per
process::

    composer -n 2 -m amortize.cli train recipes/clip-medium.yaml 'data.shards=/data/cc3m/{00000..00331}.tar'

``train --dry-run`` and ``eval`` do not need Composer; ``train`` imports it when training starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main", "load_checkpoint", "model_from_checkpoint"]


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``torch.load(..., weights_only=True)``.

    Accepts a Composer checkpoint (``ep1-ba5-rank0.pt``, ``latest-rank0.pt``), the plain export
    written by :class:`amortize.train.algorithms.ExportWeights` (``model.pt``), or a run folder
    (its ``model.pt``).

    Returns:
        ``{"recipe": dict, "model": state_dict of the two-tower model, "source": "composer" | "export"}``.

    Raises:
        FileNotFoundError: if nothing is at ``path``.
        ValueError: if the file holds no recipe or no model weights.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "model.pt"
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    from amortize.checkpoints import safe_load  # weights_only; names a refused global or a truncated file

    ck = safe_load(p)
    if isinstance(ck, dict) and str(ck.get("format", "")).startswith("amortize-weights/"):
        recipe, weights, source = ck.get("recipe"), ck["model"], "export"
    elif isinstance(ck, dict) and "state" in ck and "model" in ck["state"]:
        full = ck["state"]["model"]
        prefix = "module." if any(k.startswith("module.") for k in full) else ""
        extra = full.get(f"{prefix}_extra_state") or {}
        recipe = extra.get("recipe") if isinstance(extra, dict) else None
        head = f"{prefix}model."
        weights = {k[len(head):]: v for k, v in full.items() if k.startswith(head)}
        source = "composer"
    else:
        raise ValueError(f"{p} is neither a Composer checkpoint nor an amortize weights export")
    if recipe is None:
        raise ValueError(f"{p} stores no recipe; it was not written by `amortize train`")
    if not weights:
        raise ValueError(f"{p} holds no two-tower model weights")
    return {"recipe": recipe, "model": weights, "source": source}


def model_from_checkpoint(path: str | Path):
    """Rebuild the trained two-tower model and its recipe from a checkpoint (see :func:`load_checkpoint`).

    Returns:
        ``(model: TwoTowerModel in eval mode, recipe: Recipe)``.
    """
    from amortize.train.components import build_two_tower
    from amortize.train.config import load_recipe_dict

    ck = load_checkpoint(path)
    recipe = load_recipe_dict(ck["recipe"])
    model = build_two_tower(recipe)
    model.load_state_dict(ck["model"])
    return model.eval(), recipe


# ------------------------------------------------------------------------------------ commands


def _cmd_train(args: argparse.Namespace) -> int:
    from amortize.train.config import check_unique_overrides, load_recipe, recipe_to_yaml

    check_unique_overrides(args.overrides)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        sys.stdout.write(recipe_to_yaml(recipe))
        return 0
    from amortize.train.builders import build_trainer

    trainer = build_trainer(recipe)
    trainer.fit()
    from composer.utils import dist

    if dist.get_global_rank() == 0:
        folder = recipe.resolved_save_folder()
        print(f"checkpoints in {folder}/ ({recipe.save_latest_filename.format(rank=0)}); "
              f"weights export {os.path.join(folder, 'model.pt')}", flush=True)
    trainer.close()
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from amortize.eval import evaluate, format_jsonl, format_markdown
    from amortize.train.components import build_tokenizer

    model, recipe = model_from_checkpoint(args.checkpoint)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    tokenizer = build_tokenizer(recipe, model.context_length)
    tasks = args.tasks or ["default"]
    if tasks == ["datacomp"]:
        if not args.datacomp_root:
            raise SystemExit("--tasks datacomp needs --datacomp-root DIR (the wds_*_test folders)")
        import open_clip

        from amortize.eval.datacomp import run_datacomp

        transform = open_clip.image_transform(model.image_size, is_train=False)
        rows = run_datacomp(model, tokenizer, transform, args.datacomp_root, batch_size=args.batch_size,
                            device=device, log=lambda m: print(m, file=sys.stderr))
    else:
        from amortize.eval import default_tasks

        available = default_tasks(image_size=model.image_size)
        names = [t.name for t in available]
        if tasks != ["default"]:
            unknown = [t for t in tasks if t not in names]
            if unknown:
                raise SystemExit(f"unknown task(s) {', '.join(unknown)}; valid: default, datacomp, {', '.join(names)}")
            available = [t for t in available if t.name in tasks]
        rows = evaluate(model, tokenizer, available, batch_size=args.batch_size, device=device)
    sys.stdout.write(format_jsonl(rows) if args.json else format_markdown(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``amortize``."""
    parser = argparse.ArgumentParser(prog="amortize", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML recipe (Composer)")
    t.add_argument("recipe", help="path of the recipe YAML")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides (values parsed as YAML)")
    t.add_argument("--dry-run", action="store_true", help="check the recipe, print it resolved, do not train")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint (zero-shot, retrieval)")
    e.add_argument("checkpoint", help="Composer checkpoint, model.pt export, or run folder")
    e.add_argument("--json", action="store_true", help="print JSON lines {task, metric, value}")
    e.add_argument("--tasks", nargs="+", default=None,
                   help="default (the shipped tasks), task names among them, or datacomp")
    e.add_argument("--datacomp-root", default=None, help="folder of DataComp's wds_*_test tasks")
    e.add_argument("--batch-size", type=int, default=256, help="images or texts per forward pass")
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    e.set_defaults(func=_cmd_eval)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``amortize`` console script.

    Returns:
        The exit status (0 on success; errors in recipes exit with status 2 and their message).
    """
    from amortize.train.config import RecipeError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (RecipeError, FileNotFoundError) as e:
        print(f"amortize {args.command}: error: {e}", file=sys.stderr)
        return 2


def _run() -> Any:  # ``python -m amortize.cli`` (what Composer's launcher runs with -m)
    sys.exit(main())


if __name__ == "__main__":
    _run()

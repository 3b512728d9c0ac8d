"""The ``amortize`` command line.

::

    amortize train RECIPE.yaml [key.sub=value ...] [--dry-run] [--debug]   (flags anywhere)
    amortize eval CHECKPOINT [--json] [--tasks default | NAME ... | datacomp] [--datacomp-root DIR [--allow-partial]]
                  [--retrieval CSV_OR_FOLDER ...] [--zeroshot FOLDER ...] [--template T ...] [--debug]
    amortize export RUN_OR_CHECKPOINT OUT_DIR [--format open_clip|hf] [--overwrite] [--debug]

Every expected failure (a bad recipe value, missing data, a save folder that holds another run,
an unreadable checkpoint ...) ends in ``amortize <command>: error: <what and how to fix it>`` and
exit status 2; ``--debug`` shows the traceback instead. Ctrl-C during training saves a checkpoint
and the weights export, says how to resume, and exits with status 130.

Several processes and nodes go through Composer's launcher, which runs this module once per
process::

    composer -n 2 -m amortize.cli train recipes/clip-medium.yaml 'data.shards=/data/cc3m/{00000..00331}.tar'

``eval`` and ``export`` do not need Composer; ``train`` (``--dry-run`` included: it builds the scheduler) does.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main", "parse_args", "load_checkpoint", "model_from_checkpoint", "read_export_folder", "resume_command",
           "final_message"]


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``torch.load(..., weights_only=True)``.

    Accepts a Composer checkpoint (``ep1-ba5-rank0.pt``, ``latest-rank0.pt``), the weights export
    written by :class:`amortize.train.callbacks.ExportWeights` (:mod:`amortize.weights_export`), a
    run folder (its export :data:`~amortize.weights_export.EXPORT_FILENAME`, else its
    ``latest-rank0.pt``), or an ``amortize export`` folder (its ``open_clip_config.json`` and
    ``open_clip_model.safetensors``; see :func:`read_export_folder`).

    Returns:
        ``{"recipe": dict, "model": state_dict of the two-tower model,
        "source": "composer" | "export" | "open_clip export"}``.

    Raises:
        FileNotFoundError: if nothing is at ``path``, or a folder holds none of those files.
        CorruptCheckpointError: (a ValueError) if the file is not a checkpoint, or holds no recipe,
            no model weights or weights with NaN or Inf.
    """
    p = Path(path)
    if p.is_dir():
        p = _checkpoint_in_folder(p)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if p.name == "open_clip_config.json":
        recipe, weights, source = *read_export_folder(p.parent), "open_clip export"
        return {"recipe": recipe, "model": _finite(weights, p.parent), "source": source}
    from amortize.checkpoints import CorruptCheckpointError, safe_load  # weights_only; names a refused global
    from amortize.weights_export import is_weights_export

    ck = safe_load(p)
    if is_weights_export(ck):
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
        raise CorruptCheckpointError(f"{p} is neither a Composer checkpoint nor an amortize weights export")
    if recipe is None:
        raise CorruptCheckpointError(f"{p} stores no recipe; it was not written by `amortize train`")
    if not weights:
        raise CorruptCheckpointError(f"{p} holds no two-tower model weights")
    return {"recipe": recipe, "model": _finite(weights, p), "source": source}


def _finite(weights: dict, where: Path) -> dict:
    """``weights``, refused when a tensor holds NaN or Inf (a diverged run's)."""
    from amortize.checkpoints import CorruptCheckpointError
    from amortize.checks import non_finite_tensors

    bad = non_finite_tensors(weights)
    if bad:
        raise CorruptCheckpointError(f"{where} holds weights that are not finite ({len(bad)} tensors with NaN or Inf, "
                                     f"first: {', '.join(bad[:3])}); the run diverged")
    return weights


def _checkpoint_in_folder(folder: Path) -> Path:
    """The file a folder is read through: a run's weights export
    (:data:`~amortize.weights_export.EXPORT_FILENAME`), else its ``latest-rank0.pt`` (a run stopped
    before its export), else an ``amortize export`` folder's ``open_clip_config.json``.

    Raises:
        FileNotFoundError: naming the folder and what to pass instead.
    """
    from amortize.interop.export import CONFIG_NAME
    from amortize.weights_export import EXPORT_FILENAME

    for name in (EXPORT_FILENAME, "latest-rank0.pt", CONFIG_NAME):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} holds no {EXPORT_FILENAME}, latest-rank0.pt or {CONFIG_NAME}: pass a run folder "
                            "(save_folder), a checkpoint file, or a folder written by `amortize export`")


def read_export_folder(folder: Path) -> tuple[dict, dict]:
    """(recipe, two-tower weights) of an ``amortize export`` folder.

    The recipe holds what rebuilds the towers: the model name the export records, its image side
    and context length, its logit bias, and the tokenizer; the weights get the ``clip.`` prefix of
    :class:`~amortize.models.TwoTowerModel`.

    Raises:
        CorruptCheckpointError: for a config that is not an export's, or missing or unreadable weights.
    """
    import json

    from amortize.checkpoints import CorruptCheckpointError
    from amortize.interop.export import CONFIG_NAME, WEIGHTS_NAME

    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        cfg, name = config["model_cfg"], config["amortize"]["model_name"]
        model = {"name": name, "image_size": cfg["vision_cfg"]["image_size"],
                 "context_length": cfg["text_cfg"]["context_length"], "init_logit_bias": cfg.get("init_logit_bias")}
        tokenizer = (config.get("tokenizer") or {}).get("name") or "simple"
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{folder / CONFIG_NAME} is not the config of an `amortize export` folder "
                                     f"({type(e).__name__}: {e})") from None
    if not (folder / WEIGHTS_NAME).is_file():
        raise CorruptCheckpointError(f"{folder} holds {CONFIG_NAME} but no {WEIGHTS_NAME}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = {f"clip.{k}": v for k, v in load_file(str(folder / WEIGHTS_NAME)).items()}
    except SafetensorError as e:
        raise CorruptCheckpointError(f"{folder / WEIGHTS_NAME} is not a readable safetensors file: {e}") from None
    return {"model": model, "data": {"name": "synthetic", "tokenizer": tokenizer}}, weights


def model_from_checkpoint(path: str | Path | dict):
    """Rebuild the trained two-tower model and its recipe from a checkpoint (see :func:`load_checkpoint`).

    Args:
        path: the checkpoint, or what :func:`load_checkpoint` returned for it.

    Returns:
        ``(model: TwoTowerModel in eval mode, recipe: Recipe)``.
    """
    from amortize.train.builders import build_two_tower
    from amortize.train.config import load_recipe_dict

    from amortize.checkpoints import CorruptCheckpointError

    ck = path if isinstance(path, dict) else load_checkpoint(path)
    where = ck.get("path", "the checkpoint") if isinstance(path, dict) else path
    recipe = load_recipe_dict(ck["recipe"], bind=False)  # the towers only: no imports, no loss sections
    model = build_two_tower(recipe, start=False)  # the trained weights replace any pretrained start
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:  # size mismatch, missing or unexpected keys
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e).splitlines()[0])
        raise CorruptCheckpointError(f"{where}: its weights do not fit the model its recipe names (model.name="
                                     f"{recipe.model.name!r}, image_size={model.image_size}, context_length="
                                     f"{model.context_length}): {first}") from None
    return model.eval(), recipe


def eval_device(text: Optional[str]) -> str:
    """The device ``amortize eval`` runs on: ``text`` checked, or ``cuda`` when a GPU is there, else ``cpu``.

    Raises:
        CommandError: ``--device: 'banana' is not a device ...``, or ``--device cuda: no GPU ...``.
    """
    import torch

    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise CommandError(f"--device: {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"--device {text}: no GPU is available to PyTorch here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CommandError(f"--device {text}: there are {torch.cuda.device_count()} GPUs (cuda:0 .. "
                               f"cuda:{torch.cuda.device_count() - 1})")
    elif dev.type != "cpu" and not _backend_available(dev.type):
        raise CommandError(f"--device {text}: the {dev.type} backend is not available here; use --device cpu")
    return text


def _backend_available(kind: str) -> bool:
    import torch

    backend = getattr(torch, kind, None) or getattr(getattr(torch, "backends", None), kind, None)
    is_available = getattr(backend, "is_available", None)
    return bool(is_available and is_available())


# ------------------------------------------------------------------------------------ commands


class CommandError(Exception):
    """A command-line usage error; ``main`` prints it and exits with status 2."""


def resume_command(recipe: str, overrides: Sequence[str]) -> str:
    """The shell command that continues a run: the same recipe and overrides plus ``autoresume=true``.

    Every word the shell would change (braces, spaces, ``$``, globs) is quoted with
    :func:`shlex.quote`, so the line pastes into bash as typed. Under Composer's launcher
    (``WORLD_SIZE`` > 1) it is the launcher's command with this node's process count.

    >>> resume_command("r.yaml", ["data.shards=s/{00000..00002}.tar", "autoresume=false"])
    "amortize train r.yaml 'data.shards=s/{00000..00002}.tar' autoresume=true"
    """
    import shlex

    words = [recipe, *[o for o in overrides if not o.startswith("autoresume=")], "autoresume=true"]
    head = "amortize train"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        nproc = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
        head = f"composer -n {nproc} -m amortize.cli train"
    return " ".join([head, *(shlex.quote(w) for w in words)])


def _cmd_train(args: argparse.Namespace) -> int:
    from amortize.train.config import check_unique_overrides, load_recipe, recipe_to_yaml

    check_unique_overrides(args.overrides)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        from amortize.train.builders import dry_run
        from amortize.train.lock import check_run_lock

        stale = check_run_lock(recipe.resolved_save_folder())  # a live run's lock is refused; nothing written
        lines = dry_run(recipe) + ([f"lock: {stale}"] if stale else [])
        sys.stdout.write(recipe_to_yaml(recipe))
        print("\n".join(f"# {line}" for line in lines), file=sys.stderr)
        return 0
    from composer.utils import dist

    from amortize.train.lock import acquire_run_lock
    from amortize.train.plan import check_writable

    lock = None
    if dist.get_global_rank() == 0:  # one run per save folder (amortize.train.lock)
        check_writable(recipe.resolved_save_folder())
        lock = acquire_run_lock(recipe.resolved_save_folder())
    try:
        if lock is not None and lock.note:
            print(f"amortize train: {lock.note}", file=sys.stderr, flush=True)
        return _train(args, recipe)
    finally:
        if lock is not None:
            lock.release()


def _train(args: argparse.Namespace, recipe: Any) -> int:
    """Build the trainer of ``recipe`` and train (the save folder's lock is held by the caller)."""
    from amortize.train.builders import build_trainer
    from amortize.train.callbacks import TrainingInterrupted

    trainer = build_trainer(recipe)
    from composer.utils import dist

    if dist.get_global_rank() == 0:
        from amortize.interop.pretrained import locked_summary
        from amortize.train.model import unwrap
        from amortize.train.optim import describe_optimizer

        print(f"amortize train: {trainer.amortize_plan.describe()}", flush=True)
        print(f"amortize train: optimizer {describe_optimizer(trainer.state.optimizers[0], recipe.data.batch_size)}",
              flush=True)
        print(f"amortize train: {locked_summary(unwrap(trainer.state.model).model)}", flush=True)
        from amortize.train.builders import warmup_warning

        length = trainer.state.dataloader_len
        warm = warmup_warning(recipe, None if length is None else int(length))
        if warm:
            print(f"amortize train: warning: {warm}", flush=True)
        from amortize.train.plan import untrained_data_note

        untrained = untrained_data_note(recipe)
        if untrained:
            print(f"amortize train: warning: {untrained}", flush=True)
    try:
        trainer.fit()
    except TrainingInterrupted as e:
        if dist.get_global_rank() == 0:
            print(f"amortize train: {e}\nresume with: {resume_command(args.recipe, args.overrides)}",
                  file=sys.stderr, flush=True)
        trainer.close()
        return e.exit_status

    if dist.get_global_rank() == 0:
        print(final_message(recipe), flush=True)
    trainer.close()
    return 0


def final_message(recipe: Any) -> str:
    """The line a finished run ends with, naming only files that exist: the folder, its ``latest``
    checkpoint (or that none was kept: ``save_num_checkpoints_to_keep=0``) and the weights export."""
    from amortize.train.plan import shown_folder
    from amortize.weights_export import EXPORT_FILENAME

    folder = recipe.resolved_save_folder()
    shown = shown_folder(folder)
    latest = recipe.save_latest_filename.format(rank=0)
    if os.path.exists(os.path.join(folder, latest)):
        kept = f"checkpoints in {shown} ({latest})"
    else:
        kept = (f"no checkpoint kept in {shown} (save_num_checkpoints_to_keep="
                f"{recipe.save_num_checkpoints_to_keep}): the run cannot be resumed")
    export = "weights export " + shown + EXPORT_FILENAME if os.path.isfile(os.path.join(folder, EXPORT_FILENAME)) \
        else "no weights export written"
    return f"{kept}; {export}"


def _user_tasks(args: argparse.Namespace, image_size: int) -> list:
    """The ``--retrieval`` and ``--zeroshot`` tasks (files read now, images when evaluated)."""
    from amortize.eval.user import retrieval_task, zeroshot_task

    tasks = []
    for path in args.retrieval or []:
        tasks.append(retrieval_task(path, image_size=image_size, image_column=args.image_column,
                                    caption_column=args.caption_column, separator=args.separator))
    for path in args.zeroshot or []:
        tasks.append(zeroshot_task(path, image_size=image_size, templates=args.template or ["{}"]))
    return tasks


def _check_eval_options(args: argparse.Namespace) -> None:
    """Refuse ``amortize eval`` options that cannot work, before the checkpoint is read.

    Raises:
        CommandError: naming the option (``--template '{} and {}': has 2 '{}' fields ...``,
            ``--separator ';;': must be one character ...``).
    """
    from amortize.eval.user import UserDataError, csv_separator
    from amortize.eval.zeroshot import template_problem

    if (args.retrieval or args.zeroshot) and args.tasks == ["datacomp"]:
        raise CommandError("--retrieval/--zeroshot run your files; give them without --tasks datacomp")
    if args.template and not args.zeroshot:
        raise CommandError("--template applies to --zeroshot FOLDER, which is not given")
    for template in args.template or []:
        problem = template_problem(template)
        if problem:
            raise CommandError(f"--template {template!r}: {problem}")
    if args.separator is not None:
        try:
            csv_separator(args.separator, Path("given.csv"))
        except UserDataError as e:
            raise CommandError(f"--{e}") from None


def _cmd_eval(args: argparse.Namespace) -> int:
    from amortize.eval import evaluate, format_jsonl, format_markdown
    from amortize.train.builders import build_tokenizer

    _check_eval_options(args)
    device = eval_device(args.device)
    model, recipe = model_from_checkpoint(args.checkpoint)
    model.to(device)
    tokenizer = build_tokenizer(recipe, model.context_length)
    user = _user_tasks(args, model.image_size)
    tasks = args.tasks or ([] if user else ["default"])
    if tasks == ["datacomp"]:
        if not args.datacomp_root:
            raise CommandError("--tasks datacomp needs --datacomp-root DIR (the wds_*_test folders)")
        import open_clip

        from amortize.eval.datacomp import DATACOMP_TASKS, missing_tasks, run_datacomp

        missing = missing_tasks(args.datacomp_root)
        if len(missing) == len(DATACOMP_TASKS):
            raise CommandError(f"--datacomp-root {args.datacomp_root} holds none of the {len(DATACOMP_TASKS)} "
                               "DataComp tasks (expected wds_<task>_test folders)")
        if missing and not args.allow_partial:
            raise CommandError(f"--datacomp-root {args.datacomp_root} holds {len(DATACOMP_TASKS) - len(missing)} of "
                               f"the {len(DATACOMP_TASKS)} DataComp tasks (missing {', '.join(missing[:3])}"
                               f"{' ...' if len(missing) > 3 else ''}); add --allow-partial to average over those")
        transform = open_clip.image_transform(model.image_size, is_train=False)
        rows = run_datacomp(model, tokenizer, transform, args.datacomp_root, batch_size=args.batch_size,
                            device=device, log=lambda m: print(m, file=sys.stderr))
    else:
        if "datacomp" in tasks:
            raise CommandError("--tasks datacomp runs alone; give the shipped task names in another call")
        from amortize.eval import default_tasks

        available = default_tasks(image_size=model.image_size) if tasks else []
        names = [t.name for t in available]
        if tasks and tasks != ["default"]:
            unknown = [t for t in tasks if t not in names]
            if unknown:
                raise CommandError(f"unknown task(s) {', '.join(unknown)}; valid: default, datacomp, {', '.join(names)}")
            available = [t for t in available if t.name in tasks]
        rows = evaluate(model, tokenizer, available + user, batch_size=args.batch_size, device=device)
    sys.stdout.write(format_jsonl(rows) if args.json else format_markdown(rows))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from amortize.interop.export import export_model

    ck = load_checkpoint(args.checkpoint)
    model, recipe = model_from_checkpoint(ck)
    try:
        written = export_model(model, args.out_dir, model_name=recipe.model.name, tokenizer=recipe.data.tokenizer,
                               fmt=args.format, overwrite=args.overwrite,
                               extra={"method": recipe.method, "run_name": recipe.run_name, "source": ck["source"],
                                      "checkpoint": str(args.checkpoint)})
    except ValueError as e:
        raise CommandError(str(e)) from None
    out = Path(args.out_dir)
    print(f"exported {recipe.model.name} towers to {out}/ ({', '.join(p.name for p in written)}); load with "
          f"open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line; an error re-raised from a DataLoader worker carries the
    worker's traceback in its text, of which only the last line (the original message) is kept."""
    text = str(e)
    if "Original Traceback" not in text:  # a message of several lines (torch's load errors) is joined into one
        return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    prefix = f"{type(e).__module__}.{type(e).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def _expected_errors() -> tuple[type, ...]:
    """Exception types that report a user's mistake or a data problem, not a bug."""
    from amortize.checkpoints import CheckpointWriteError, CorruptCheckpointError, UnsafeCheckpointError
    from amortize.data.webdataset import TooManySkippedError
    from amortize.eval.user import UserDataError
    from amortize.interop.pretrained import PretrainedError
    from amortize.train.config import RecipeError

    out: list[type] = [RecipeError, CommandError, FileNotFoundError, CorruptCheckpointError, UnsafeCheckpointError,
                       TooManySkippedError, CheckpointWriteError, UserDataError, PretrainedError]
    # a run's own failures, looked up only where a run was built (these modules import Composer)
    for module, name in (("amortize.train.algorithms", "DivergenceError"),
                         ("amortize.train.callbacks", "NonFiniteWeightsError")):
        if module in sys.modules:
            out.append(getattr(sys.modules[module], name))
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``amortize``."""
    from amortize.weights_export import EXPORT_FILENAME  # imports neither torch nor Composer

    parser = argparse.ArgumentParser(prog="amortize", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML recipe (Composer)")
    t.add_argument("recipe", help="path of the recipe YAML")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides (values parsed as YAML)")
    t.add_argument("--dry-run", action="store_true",
                   help="build everything the run would (model, data, optimizer, start decision), print the "
                        "resolved recipe, do not train")
    t.add_argument("--debug", action="store_true", help="show the traceback of an error")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint (zero-shot, retrieval)")
    e.add_argument("checkpoint", help=f"Composer checkpoint, {EXPORT_FILENAME} export, or run folder")
    e.add_argument("--json", action="store_true", help="print JSON lines {task, metric, value}")
    e.add_argument("--tasks", nargs="+", default=None,
                   help="default (the shipped tasks), task names among them, or datacomp")
    e.add_argument("--datacomp-root", default=None, help="folder of DataComp's wds_*_test tasks")
    e.add_argument("--allow-partial", action="store_true",
                   help="evaluate a DataComp root that lacks some of the 38 tasks (averages say 'N of 38')")
    e.add_argument("--retrieval", action="append", metavar="CSV_OR_FOLDER",
                   help="image-text retrieval on your files: a CSV/TSV of image paths and captions, or a folder "
                        "of images with sidecar .txt captions (repeatable)")
    e.add_argument("--image-column", default="filepath", help="CSV column of image paths (default: filepath)")
    e.add_argument("--caption-column", default="title", help="CSV column of captions (default: title)")
    e.add_argument("--separator", default=None, help="CSV field separator (default: tab for .tsv, else comma)")
    e.add_argument("--zeroshot", action="append", metavar="FOLDER",
                   help="zero-shot classification of a folder with one sub-folder of images per class (repeatable)")
    e.add_argument("--template", action="append", metavar="T",
                   help="prompt template with {} for the class name (repeatable; default: {}, the name alone)")
    e.add_argument("--batch-size", type=_positive_int, default=256, help="images or texts per forward pass")
    e.add_argument("--debug", action="store_true", help="show the traceback of an error")
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    e.set_defaults(func=_cmd_eval)

    x = sub.add_parser("export", help="write the towers as an open_clip model folder (safetensors)")
    x.add_argument("checkpoint", help=f"run folder, {EXPORT_FILENAME} export or Composer checkpoint")
    x.add_argument("out_dir", help="the folder to write (new or empty)")
    x.add_argument("--format", choices=("open_clip", "hf"), default="open_clip",
                   help="open_clip: a folder for local-dir: / pretrained=; hf: the same plus a model card, to upload "
                        "to the Hugging Face Hub for open_clip's hf-hub: loader")
    x.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export in OUT_DIR")
    x.add_argument("--debug", action="store_true", help="show the traceback of an error")
    x.set_defaults(func=_cmd_export)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse a command line; ``train``'s flags may stand anywhere, before, between or after overrides.

    argparse gives the ``overrides`` positional only the words before the first flag; the words
    after it come back unrecognised and are overrides too. Anything else unrecognised (a
    misspelled flag) is refused with argparse's usage message (exit 2).
    """
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:
        flags = [w for w in rest if w.startswith("-")]
        if args.command != "train" or flags:
            parser.error(f"unrecognized arguments: {' '.join(flags or rest)}")
        args.overrides = [*args.overrides, *rest]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``amortize`` console script.

    Returns:
        The exit status: 0 on success; 2 for an expected failure (its message names the problem
        and the fix; ``--debug`` raises it instead); 130 when Ctrl-C, 143 when SIGTERM stopped
        training (after saving).
    """
    args = parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C before training started (or a second one): nothing half-written
        if args.debug:
            raise
        print(f"amortize {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug or not isinstance(e, _expected_errors()):
            raise
        print(f"amortize {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _run() -> Any:  # ``python -m amortize.cli`` (what Composer's launcher runs with -m)
    sys.exit(main())


if __name__ == "__main__":
    _run()

#!/usr/bin/env python
"""Regenerate the ``make demo`` table in README.md and docs/index.md from a run.

    python scripts/demo_table.py --run                                # train + eval (as make demo), then rewrite
    python scripts/demo_table.py --eval-json eval.jsonl --wall-s 493  # rewrite from a finished run's output

``--run`` (``make demo-table``) runs what ``make demo`` runs, ``amortize train recipes/default.yaml save_overwrite=true``
then ``amortize eval runs/default/latest-rank0.pt --json``, times the two together, and rewrites the
block between ``<!-- demo-table:start -->`` and ``<!-- demo-table:end -->`` in each file with the
evaluation table, the date, the wall time, the machine's CPU model, core count and the CPU kernels
PyTorch picked, and the git commit the run was made on (marked ``+ uncommitted changes`` when the
work tree differs from it). Everything outside the markers is left as it is.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amortize.eval.report import format_markdown  # noqa: E402

START = "<!-- demo-table:start -->"
END = "<!-- demo-table:end -->"
FILES = ("README.md", "docs/index.md")
CHECKPOINT = "runs/default/latest-rank0.pt"


def parse_eval_jsonl(text: str) -> list[dict]:
    """Rows of ``amortize eval --json`` output (one JSON object per non-empty line).

    Raises:
        ValueError: when a line is not JSON or a row lacks ``task``, ``metric`` or ``value``, or there are no rows.
    """
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"eval output line {i} is not JSON: {line[:80]!r}") from e
        missing = [k for k in ("task", "metric", "value") if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"eval output line {i} lacks {', '.join(missing)}: {line[:80]!r}")
        rows.append(row)
    if not rows:
        raise ValueError("eval output has no rows")
    return rows


def format_duration(seconds: float) -> str:
    """``493.4`` -> ``"8 min 13 s"``; under a minute ``"42 s"``."""
    total = int(round(seconds))
    minutes, secs = divmod(total, 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def render_block(rows: list[dict], *, wall_s: float, date: str, cpu: str, cores: int, kernels: str,
                 commit: str, made_by: str = "`make demo-table`") -> str:
    """The text between the markers: the evaluation table and the line saying where it came from.

    Args:
        rows: evaluation rows ``{task, metric, value}``.
        wall_s: seconds that training plus evaluation took.
        date: ``YYYY-MM-DD`` of the run.
        cpu: the CPU model name.
        cores: CPU cores the run could use.
        kernels: PyTorch's CPU capability (``AVX512``, ``AVX2``, ``DEFAULT``).
        commit: short git hash the run was made on (with ``+ uncommitted changes`` when dirty).
        made_by: the command that wrote the table (markdown).

    Returns:
        Markdown ending in a newline, without the markers.
    """
    return (
        format_markdown(rows)
        + "\n"
        + f"Made by {made_by} on {date} at commit `{commit}`: "
        f"training and evaluation took {format_duration(wall_s)} on {cpu} ({cores} cores, PyTorch "
        f"{kernels} CPU kernels).\n"
    )


def replace_block(text: str, block: str, where: str = "text") -> str:
    """``text`` with everything between :data:`START` and :data:`END` replaced by ``block``.

    Raises:
        ValueError: when the markers are missing, repeated or out of order (naming ``where``).
    """
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"{where} needs exactly one {START} followed by one {END}")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{block}{END}{tail}"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def core_count() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def torch_kernels() -> str:
    """The vector width of PyTorch's CPU kernels on this machine (``AVX512``, ``AVX2`` ...)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def git_commit(root: Path = ROOT) -> str:
    """Short hash of HEAD, with ``+ uncommitted changes`` when tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                           text=True, check=True).stdout.strip()
    return f"{head} + uncommitted changes" if dirty else head


def run_demo(root: Path = ROOT) -> tuple[str, float]:
    """Train the default recipe and evaluate it as ``make demo`` does; returns (eval JSON lines, seconds)."""
    exe = Path(sys.executable).with_name("amortize")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "amortize.cli"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    subprocess.run([*cli, "train", "recipes/default.yaml", "save_overwrite=true"], cwd=root, env=env, check=True)
    out = subprocess.run([*cli, "eval", CHECKPOINT, "--json"], cwd=root, env=env, check=True, capture_output=True,
                         text=True).stdout
    return out, time.perf_counter() - t0


def rewrite_files(block: str, files=FILES, root: Path | None = None) -> list[Path]:
    """Rewrite the marked block of each file under ``root`` (default: the repository); all are checked
    before any is written. Returns the paths."""
    root = ROOT if root is None else root
    paths = [root / f for f in files]
    new = {p: replace_block(p.read_text(), block, where=str(p.relative_to(root))) for p in paths}
    for p, text in new.items():
        p.write_text(text)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", action="store_true", help="train and evaluate the default recipe now (as make demo)")
    src.add_argument("--eval-json", type=Path, help="output of `amortize eval ... --json` from a finished run")
    p.add_argument("--wall-s", type=float, help="seconds the run took (with --eval-json)")
    p.add_argument("--files", nargs="+", default=list(FILES), help="files to rewrite (relative to the repository)")
    args = p.parse_args(argv)
    if args.run:
        if args.wall_s is not None:
            p.error("--wall-s goes with --eval-json; --run measures the time itself")
        commit = git_commit()  # before the run: the commit the run is made on
        text, wall_s = run_demo()
        made_by = "`make demo-table`"
    else:
        if args.wall_s is None:
            p.error("--eval-json needs --wall-s (the seconds training and evaluation took)")
        commit, text, wall_s = git_commit(), args.eval_json.read_text(), args.wall_s
        made_by = "`scripts/demo_table.py --eval-json` from a `make demo` run"
    block = render_block(parse_eval_jsonl(text), wall_s=wall_s, date=_dt.datetime.now(_dt.timezone.utc).date().isoformat(),
                         cpu=cpu_model(), cores=core_count(), kernels=torch_kernels(), commit=commit,
                         made_by=made_by)
    for path in rewrite_files(block, args.files, root=ROOT):
        print(f"rewrote the demo table in {path.relative_to(ROOT)}")
    sys.stdout.write(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())

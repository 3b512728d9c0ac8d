"""The options of :class:`~amortize.eval.callback.EvalCallback` and the `eval.tasks` choice, declared without Composer.

The recipe's ``eval`` section is checked against :class:`EvalOptions` (the callback's
``__init__``, which :class:`~amortize.eval.callback.EvalCallback` inherits), so loading a recipe
does not import Composer; the callback itself is imported when it is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Union

import torch

from amortize.options import NONNEGATIVE, Range, RecipeError

__all__ = ["EvalOptions", "EVAL_TASK_CHOICES", "eval_tasks"]


class EvalOptions:
    """The constructor of :class:`~amortize.eval.callback.EvalCallback` (its arguments are documented there)."""

    def __init__(self, tokenizer: Callable[[Sequence[str]], torch.Tensor], tasks: Sequence | None = None, *,
                 every_n_epochs: Annotated[int, NONNEGATIVE] = 1, at_fit_end: bool = True,
                 batch_size: Annotated[int, Range(lo=1)] = 256, prefix: str = "eval", print_table: bool = False,
                 every_n_batches: Annotated[int, NONNEGATIVE] = 0):
        self.tokenizer = tokenizer
        self._tasks = list(tasks) if tasks is not None else None
        self.every_n_epochs = every_n_epochs
        self.every_n_batches = every_n_batches
        self._last_batch = -1
        self.at_fit_end = at_fit_end
        self.batch_size = batch_size
        self.prefix = prefix
        self.print_table = print_table
        self.last_rows: list[dict] = []


EVAL_TASK_CHOICES = ("default", "none")
"""The names ``eval.tasks`` takes instead of a list of task sections."""


class _TaskChoice:
    """``eval.tasks``: one of :data:`EVAL_TASK_CHOICES` or a non-empty list of task sections."""

    def check(self, value: Any, key: str) -> None:
        if (isinstance(value, str) and value not in EVAL_TASK_CHOICES) or value == []:
            raise RecipeError(f"{value!r} is not one of {', '.join(EVAL_TASK_CHOICES)}, or a list of task sections "
                              "(retrieval, zeroshot, default)", key=key)


def eval_tasks(tasks: Annotated[Union[str, list[Union[str, dict]]], _TaskChoice()] = "none") -> None:
    """The option the ``eval`` section holds beside :class:`~amortize.eval.callback.EvalCallback`'s own.

    The section's other options (``every_n_epochs``, ``every_n_batches``, ``at_fit_end``,
    ``batch_size``, ``prefix``) are the callback's keyword arguments, with its defaults; the builder
    passes the callback the tokenizer and the tasks built from this option, and builds no callback
    when it is ``none`` or when the callback would never run.

    Args:
        tasks: ``default`` (Fashion-MNIST zero-shot and emoji retrieval), ``none``, or a list of
            sections of :data:`amortize.eval.user.EVAL_TASKS` (your files), each bound as
            ``eval.tasks[i]``, e.g. ``[{name: retrieval, path: pairs.csv}, {name: zeroshot, path:
            classes/}, default]``. The DataComp suite needs its data directory: run ``amortize eval
            CKPT --tasks datacomp --datacomp-root DIR``.
    """

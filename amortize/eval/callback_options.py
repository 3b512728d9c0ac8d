"""The options of :class:`~amortize.eval.callback.EvalCallback`, declared without Composer.

The recipe's ``eval`` section is checked against :class:`EvalOptions` (the callback's
``__init__``, which :class:`~amortize.eval.callback.EvalCallback` inherits), so loading a recipe
does not import Composer; the callback itself is imported when it is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated

import torch

from amortize.options import NONNEGATIVE, Range

__all__ = ["EvalOptions"]


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

"""A Composer callback running the evaluation tasks at the end of epochs and/or of training.

This is the only module of ``amortize.eval`` that imports Composer.
"""

from __future__ import annotations

from composer.core import Callback, Event, State
from composer.loggers import Logger

from amortize.eval import evaluate
from amortize.eval.callback_options import EvalOptions
from amortize.eval.report import format_markdown


def unwrap_clip_model(model):
    """The module exposing ``encode_image``/``encode_text`` inside a Composer model (or the model).

    Raises:
        TypeError: if neither the model nor its ``.model``/``.module`` has that interface.
    """
    for cand in (model, getattr(model, "model", None), getattr(model, "module", None),
                 getattr(getattr(model, "module", None), "model", None)):
        if cand is not None and hasattr(cand, "encode_image") and hasattr(cand, "encode_text"):
            return cand
    raise TypeError(f"{type(model).__name__} has no encode_image/encode_text (nor its .model/.module)")


class EvalCallback(EvalOptions, Callback):
    """Evaluate every ``every_n_batches`` batches, at epoch end (every ``every_n_epochs``) and/or at
    fit end, and log ``prefix/task/metric``.

    Args:
        tokenizer: captions -> LongTensor (N, L).
        tasks: evaluation tasks; ``None`` uses [`default_tasks`][amortize.eval.default_tasks] (built lazily).
        every_n_epochs: run at the end of every n-th epoch (0: never at epoch end).
        every_n_batches: run after every n-th batch (0: never).
        at_fit_end: run when training ends.
        batch_size: images or texts per forward pass.
        prefix: metric name prefix.
        print_table: print the markdown table after each run (rank 0 only).

    The rows of the latest run are kept in ``self.last_rows``.
    """

    @property
    def tasks(self) -> list:
        """The tasks (the default ones are built on first use)."""
        if self._tasks is None:
            from amortize.eval import default_tasks

            self._tasks = default_tasks()
        return self._tasks

    def _run(self, state: State, logger: Logger) -> None:
        model = unwrap_clip_model(state.model)
        device = next(model.parameters()).device if any(True for _ in model.parameters()) else "cpu"
        self.last_rows = evaluate(model, self.tokenizer, self.tasks, batch_size=self.batch_size, device=device)
        logger.log_metrics({f"{self.prefix}/{r['task']}/{r['metric']}": r["value"] for r in self.last_rows
                            if r["value"] is not None})
        if self.print_table:
            from composer.utils import dist

            if dist.get_global_rank() == 0:
                print(format_markdown(self.last_rows))

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        """Composer hook (each batch count is evaluated at most once, whichever events fall on it)."""
        batch = int(state.timestamp.batch)
        due = (
            (event == Event.BATCH_END and self.every_n_batches > 0 and batch % self.every_n_batches == 0)
            or (event == Event.EPOCH_END and self.every_n_epochs > 0
                and int(state.timestamp.epoch) % self.every_n_epochs == 0)
            or (event == Event.FIT_END and self.at_fit_end)
        )
        if due and batch != self._last_batch:
            self._last_batch = batch
            self._run(state, logger)

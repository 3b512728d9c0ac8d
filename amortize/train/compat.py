"""The one place that relies on private APIs of Composer and torch, each where no public one exists.

* :func:`install_atomic_checkpoint_writes`: Composer 0.32 writes a checkpoint straight into its final
  name and offers no hook for the file write, so its writer is wrapped (once, idempotently) to write
  through :func:`amortize.checkpoints.atomic_path`.
* :func:`ddp_ignore`: Composer wraps the model in ``DistributedDataParallel`` itself and passes no
  ``broadcast_buffers``; DDP reads the attribute ``_ddp_params_and_buffers_to_ignore`` of the wrapped
  module, which is how the estimator's buffers (identical on every process by construction, possibly
  dataset-sized) are kept out of DDP's per-step broadcast.

``tests/train/test_compat.py`` fails loudly if the pinned Composer or torch changes these privates.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

from torch import nn

__all__ = ["PINNED_COMPOSER", "install_atomic_checkpoint_writes", "ddp_ignore", "loss_state_to_ignore", "rollback_keys"]

PINNED_COMPOSER = "0.32.1"
"""The Composer release these workarounds were written against (its last release)."""


def install_atomic_checkpoint_writes() -> None:
    """Make Composer's checkpoint writes atomic (idempotent).

    Composer opens the final file name and writes into it, so a kill during a save would leave a
    truncated file under a real checkpoint name. Its writer ``_write_checkpoint_file(state_dict,
    filename)`` is wrapped to write a temporary file beside the target and rename it into place
    (:func:`amortize.checkpoints.atomic_path`). The ``latest`` link is re-pointed by Composer only
    after the write returns, so it never names a partial file; :func:`amortize.checkpoints.recover_latest`
    repairs the one moment Composer leaves without a link.
    """
    from composer.utils import checkpoint as ck

    from amortize.checkpoints import atomic_path

    original = ck._write_checkpoint_file
    if getattr(original, "_amortize_atomic", False):
        return

    @functools.wraps(original)
    def write_atomic(state_dict: dict[str, Any], filename: str) -> None:
        with atomic_path(filename) as tmp:
            original(state_dict, tmp)

    write_atomic._amortize_atomic = True  # type: ignore[attr-defined]
    ck._write_checkpoint_file = write_atomic


def ddp_ignore(module: nn.Module, names: Iterable[str]) -> None:
    """Tell a later ``DistributedDataParallel(module)`` to neither broadcast nor reduce ``names``.

    Args:
        module: the module DDP will wrap.
        names: fully qualified parameter and buffer names of ``module``.
    """
    module._ddp_params_and_buffers_to_ignore = list(names)


def _declared(loss_fn: nn.Module) -> dict:
    """``{fully qualified name: StateRule}`` of the loss module's estimator's declared tensors."""
    est = getattr(loss_fn, "estimator", None)
    if est is None or not hasattr(est, "declared_tensors"):
        return {}
    return dict(est.declared_tensors(prefix="estimator."))


def loss_state_to_ignore(loss_fn: nn.Module, prefix: str = "loss_fn.") -> list[str]:
    """The loss module's tensors DDP must leave alone, read from the estimator's declared state.

    Declared estimator state is either ``identical`` on every process (each applies the same
    update) or ``per_process``; neither may be broadcast from rank 0 or reduced. The loss
    module's own buffers (its epoch counters) and any tensor an estimator did not declare are
    identical by construction and ignored too.
    """
    declared = _declared(loss_fn)
    names = [n for n, _ in loss_fn.named_parameters()] + [n for n, _ in loss_fn.named_buffers()]
    ignored = [n for n in names if n not in declared or declared[n].cross_process in ("identical", "per_process")]
    return [f"{prefix}{n}" for n in ignored]


def rollback_keys(loss_fn: nn.Module) -> list[str]:
    """The loss module's ``state_dict`` keys the divergence guard snapshots and restores: everything
    but the estimator state declared ``resume="reset"``."""
    declared = _declared(loss_fn)
    return [k for k in loss_fn.state_dict() if k not in declared or declared[k].resume == "restore"]

"""Composer's loggers, callbacks and algorithms, by name, for a recipe's ``loggers:``, ``callbacks:`` and ``algorithms:``.

Each list entry is a section ``{name, **constructor options}`` (or just the name), bound once at
load against the constructor's signature like every other section, and built once when the run
(or ``--dry-run``) starts::

    loggers:
      - {name: file, filename: "{run_name}/log.txt"}
      - {name: tensorboard, log_dir: runs/tb}         # pip install 'amortize[tensorboard]'
    callbacks:
      - lr_monitor                                     # lr-AdamW/group0 ... every batch
      - {name: speed_monitor, window_size: 10}         # throughput/samples_per_sec ...
    algorithms:
      - {name: ema, half_life: 100ba}

A name whose package is not installed is refused when the recipe loads, with the command that
installs it. A user's ``imports:`` file adds its own with ``CALLBACKS.register("name", MyCallback)``.
Composer's own are bound against their declared options (:mod:`amortize.train.composer_options`)
and imported when built: neither importing this module nor loading a recipe imports Composer.
Checkpointing callbacks are not here: the recipe's ``save_*`` keys configure Composer's checkpointing.
"""

from __future__ import annotations

from typing import Any

from amortize.registry import Registry
from amortize.train.composer_options import declared
from amortize.train.guard_options import EstimatorMonitorOptions

__all__ = ["LOGGERS", "CALLBACKS", "ALGORITHMS"]

LOGGERS: Registry[Any] = Registry("logger")
"""Composer logger destinations: ``file``, ``tensorboard``, ``wandb``, ``mlflow``, ``comet_ml``, ``in_memory``."""

CALLBACKS: Registry[Any] = Registry("callback")
"""Composer callbacks: ``lr_monitor``, ``speed_monitor``, ``memory_monitor``, ``optimizer_monitor`` ...,
and amortize's ``estimator_monitor`` (:class:`amortize.train.callbacks.EstimatorMonitorCallback`)."""

ALGORITHMS: Registry[Any] = Registry("algorithm")
"""Composer algorithms a run may add to its own (``ema``, ``swa``, ``sam``)."""

for _name, _target, _needs, _install in (
    ("file", "FileLogger", None, None),
    ("in_memory", "InMemoryLogger", None, None),
    ("tensorboard", "TensorboardLogger", "tensorboard", "pip install 'amortize[tensorboard]'"),
    ("wandb", "WandBLogger", "wandb", "pip install wandb"),
    ("mlflow", "MLFlowLogger", "mlflow", "pip install mlflow"),
    ("comet_ml", "CometMLLogger", "comet_ml", "pip install comet_ml"),
):
    _target = f"composer.loggers:{_target}"
    LOGGERS.register_import(_name, _target, needs=_needs, install=_install, options=declared(_target))

for _name, _target in (
    ("lr_monitor", "LRMonitor"),
    ("speed_monitor", "SpeedMonitor"),
    ("memory_monitor", "MemoryMonitor"),
    ("optimizer_monitor", "OptimizerMonitor"),
    ("runtime_estimator", "RuntimeEstimator"),
    ("nan_monitor", "NaNMonitor"),
    ("activation_monitor", "ActivationMonitor"),
    ("early_stopper", "EarlyStopper"),
    ("threshold_stopper", "ThresholdStopper"),
):
    _target = f"composer.callbacks:{_target}"
    CALLBACKS.register_import(_name, _target, options=declared(_target))

CALLBACKS.register_import("estimator_monitor", "amortize.train.callbacks:EstimatorMonitorCallback",
                          options=EstimatorMonitorOptions)
# on by default for a stateful estimator (amortize.train.builders.build_trainer); ``policy: none`` turns it off

for _name, _target in (("ema", "EMA"), ("swa", "SWA"), ("sam", "SAM")):
    _target = f"composer.algorithms:{_target}"
    ALGORITHMS.register_import(_name, _target, options=declared(_target))

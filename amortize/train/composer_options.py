"""The options of Composer's loggers, callbacks and algorithms, declared without Composer.

A recipe's ``loggers:``, ``callbacks:`` and ``algorithms:`` entries (:mod:`amortize.train.integrations`)
are checked at load against these declarations, so loading a recipe does not import Composer; the
class itself is imported when its entry is built. Each declaration restates its class's
``__init__`` in Composer 0.32.1: every parameter's name, kind and default, which
``tests/unit/test_composer_declarations.py`` compares with the installed Composer, and its type
where a recipe can write it (plain data; a parameter that also takes a function or a Composer
object is typed as Composer allows it for a recipe, or left to Composer: ``Any``).

A declaration is data: a tuple of ``(name, type, default)`` in the order of the signature,
:data:`REQUIRED` as the default of a parameter without one, and :data:`KEYWORD_ONLY` before the
keyword-only ones (Python's bare ``*``).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Union

__all__ = ["REQUIRED", "KEYWORD_ONLY", "OPTIONS", "declared"]

REQUIRED = inspect.Parameter.empty
"""The default of a parameter a recipe must set (Composer gives it none)."""

KEYWORD_ONLY = "*"
"""In a declaration, the parameters after it are keyword-only."""

_TIME = Union[int, str]  # a Composer time as a recipe writes it: 25 (batches) or "25ba"

OPTIONS: dict[str, tuple[Any, ...]] = {
    "composer.loggers:FileLogger": (
        ("filename", str, "{run_name}/logs-rank{rank}.txt"), ("remote_file_name", Optional[str], None),
        KEYWORD_ONLY, ("capture_stdout", bool, True), ("capture_stderr", bool, True), ("buffer_size", int, 1),
        ("log_traces", bool, True), ("flush_interval", int, 100), ("overwrite", bool, False)),
    "composer.loggers:InMemoryLogger": (),
    "composer.loggers:TensorboardLogger": (
        ("log_dir", Optional[str], None), ("flush_interval", int, 100), ("rank_zero_only", bool, True)),
    "composer.loggers:WandBLogger": (
        ("project", Optional[str], None), ("group", Optional[str], None), ("name", Optional[str], None),
        ("entity", Optional[str], None), ("tags", Optional[list[str]], None), ("log_artifacts", bool, False),
        ("rank_zero_only", bool, True), ("init_kwargs", Optional[dict], None)),
    "composer.loggers:MLFlowLogger": (
        ("experiment_name", Optional[str], None), ("run_name", Optional[str], None), ("tags", Optional[dict], None),
        ("tracking_uri", Optional[str], None), ("rank_zero_only", bool, True), ("flush_interval", int, 10),
        ("model_registry_prefix", str, ""), ("model_registry_uri", Optional[str], None),
        ("synchronous", bool, False), ("log_system_metrics", bool, True), ("rename_metrics", Optional[dict], None),
        ("ignore_metrics", Optional[list[str]], None), ("ignore_hyperparameters", Optional[list[str]], None),
        ("run_group", Optional[str], None), ("resume", bool, False), ("logging_buffer_seconds", Optional[int], 10),
        ("log_duplicated_metric_every_n_steps", int, 100)),
    "composer.loggers:CometMLLogger": (
        ("workspace", Optional[str], None), ("project_name", Optional[str], None), ("log_code", bool, False),
        ("log_graph", bool, False), ("name", Optional[str], None), ("rank_zero_only", bool, True),
        ("exp_kwargs", Optional[dict], None)),
    "composer.callbacks:LRMonitor": (),
    "composer.callbacks:SpeedMonitor": (
        ("window_size", int, 100), ("gpu_flops_available", Optional[float], None), ("time_unit", str, "hours")),
    "composer.callbacks:MemoryMonitor": (
        ("memory_keys", Optional[dict], None), ("dist_aggregate_batch_interval", Optional[int], None)),
    "composer.callbacks:OptimizerMonitor": (("log_optimizer_metrics", bool, True), ("batch_log_interval", int, 10)),
    "composer.callbacks:RuntimeEstimator": (("skip_batches", int, 1), ("time_unit", str, "hours")),
    # Composer's takes (*args, **kwargs) from Callback.__init__, which ignores them: no options
    "composer.callbacks:NaNMonitor": (),
    "composer.callbacks:ActivationMonitor": (
        ("interval", _TIME, "25ba"), ("ignore_module_types", Optional[list[str]], None),
        ("only_log_wandb", bool, True)),
    "composer.callbacks:EarlyStopper": (
        ("monitor", str, REQUIRED), ("dataloader_label", str, REQUIRED), ("comp", Any, None),
        ("min_delta", float, 0.0), ("patience", _TIME, 1)),
    "composer.callbacks:ThresholdStopper": (
        ("monitor", str, REQUIRED), ("dataloader_label", str, REQUIRED), ("threshold", float, REQUIRED),
        KEYWORD_ONLY, ("comp", Any, None), ("stop_on_batch", bool, False)),
    "composer.algorithms:EMA": (
        ("half_life", Optional[str], "1000ba"), ("smoothing", Optional[float], None), ("ema_start", str, "0.0dur"),
        ("update_interval", Optional[str], None)),
    "composer.algorithms:SWA": (
        ("swa_start", str, "0.7dur"), ("swa_end", str, "0.97dur"), ("update_interval", str, "1ep"),
        ("schedule_swa_lr", bool, False), ("anneal_strategy", str, "linear"), ("anneal_steps", int, 10),
        ("swa_lr", Optional[float], None)),
    "composer.algorithms:SAM": (("rho", float, 0.05), ("epsilon", float, 1e-12), ("interval", int, 1)),
}
"""The declaration of each class's constructor, by where the class lives (``"composer.callbacks:SpeedMonitor"``)."""


def declared(target: str) -> inspect.Signature:
    """The signature :data:`OPTIONS` declares for ``target``, as :func:`inspect.signature` reads the class's.

    Raises:
        KeyError: for a class not declared here.
    """
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = []
    for option in OPTIONS[target]:
        if option == KEYWORD_ONLY:
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        name, annotation, default = option
        params.append(inspect.Parameter(name, kind, default=default, annotation=annotation))
    return inspect.Signature(params)

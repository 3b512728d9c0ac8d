"""Small-batch transfer suite: every method, three real datasets, B = 16 / 64 / 256, lr chosen on validation.

    python -m studies.transfer --quick                     # make bench: 1 dataset, 2 epochs, 2 methods
    python -m studies.transfer --stage lr                  # lr grid on val (seed 0)
    python -m studies.transfer --stage test                # chosen lr, seeds 0 1 2, test split
    python -m studies.transfer --stage variants            # AmorLIP estimator variants, val, B = 16
    python -m studies.transfer --stage convergence         # CLIP and AmorLIP at 24 / 48 epochs (val, seed 0)
    python -m studies.transfer --stage long                # CLIP and AmorLIP at B = 16, 24 epochs, seeds 0 1 2 (test)
    python -m studies.transfer --stage report              # tables + plot from the jsonl files
    python -m studies.transfer --stage all                 # lr, test, variants, report (12 epochs everywhere)
    python -m studies.transfer --stage lr --epochs converged --out converged     # the full run (CLIP at B = 256
    python -m studies.transfer --stage test --epochs converged --out converged   #   converged): lr, test, report
    python -m studies.transfer --stage report --out converged

**Data**: :mod:`studies.suite_data` (``emoji``, ``fashion``, ``glyphs``), splits by image.
**Towers**: :class:`studies.small_batch.SmallTwoTower` (an MLP per image or tile, a mean of
token embeddings for text, 64-d). **Loop**: the studies' one loop (:func:`studies.loop.train_loop`:
AdamW with warm-up and cosine decay, clip 1.0, ``s <= 100``), equal epochs at every batch
(``--epochs``: per dataset, :data:`CONVERGED_EPOCHS` where CLIP at B = 256 has converged). **Loss**:
each method's ``loss:`` section (:data:`METHODS`, data: a new estimator is one more entry), bound
by the recipe binder and built as ``amortize train`` builds a recipe's (:func:`build_loss`); every
run's section is bound before any run trains (:func:`check_sections`). AmorLIP's and NeuCLIP's
sections are read by the recipe loader from ``recipes/amorlip-small-batch.yaml`` and
``recipes/neuclip-small-batch.yaml`` and adapted to the run by :func:`adapt_small_batch` (what a
recipe knows: batch, epochs, steps per epoch).

**Optimiser search** (``--stage lr``, validation split, seed 0, every method alike): per (dataset,
method, batch) the grid of ``LR_MULTS`` times ``2e-3 * sqrt(B / 16)``, at ``BETA2_SEARCH_BATCHES``
each also with the rule's beta2 (:func:`rule_beta2`); then the grid's best point once more with
the logit scale at each of :data:`SCALE_LRS` (:func:`scale_lr_runs`). :func:`chosen_setting` picks
the best ``(lr, beta2, logit_scale_lr)``; the test stage uses it. A run that a recorded row already
trained is reused, not trained again (:func:`reuse_trained`).

**Diagnostics per run** (every epoch, in the jsonl): ``norm_err``: RMSE in log space of the
encoder normaliser (queried in eval mode on random training batches) against the exact
full-dataset partition at this batch, ``log((B-1)/(N-1) sum_{j != i} exp(S_ij) + c exp(S_ii))``;
``batch_err``: the same for the in-batch sums; ``w_mean`` / ``w_sd``: mean and spread over the
epoch's rows of ``log(Z_batch_i / lambda_i)``, the log of the total weight the encoder gradient
gives row ``i``'s negatives relative to InfoNCE's (0 for in-batch); ``scale``: the temperature
``s``; and the :class:`amortize.diagnostics.EstimatorMonitor` verdict.

Results: ``results/studies/transfer*.runs.jsonl`` (one line per finished run, resumed on rerun),
``results/studies/transfer.{json,md}``, ``docs/assets/transfer_batch.png`` (``--out``: the prefix of all three).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from benchmarks.common import RESULTS_DIR
from studies.loop import train_loop
from studies.small_batch import SmallTwoTower, encode_split

ROOT = Path(__file__).resolve().parents[1]
OUT = RESULTS_DIR / "studies"
"""Where this study's rows (``<out>.runs.jsonl``) and tables (``<out>.{json,md}``) live (:data:`benchmarks.common.RESULTS_DIR`)."""
RECIPES = ROOT / "recipes"
SMALL_BATCH_RECIPE = RECIPES / "amorlip-small-batch.yaml"

DATASET_NAMES = ("emoji", "fashion", "glyphs")
BATCHES = (16, 64, 256)
SEEDS = (0, 1, 2)
EPOCHS = 12
LR_MULTS = (0.5, 1.0, 2.0)
CLIP_SCALE = math.log(1 / 0.07)
BETA2 = 0.98
"""AdamW's beta2 of every run unless a run says otherwise (CLIP's large-batch value)."""
BETA2_REFERENCE_BATCH = 256
"""The batch at which :data:`BETA2` is taken to be right: the rule's beta2 at batch B is
``BETA2 ** (B / BETA2_REFERENCE_BATCH)`` (:func:`amortize.train.optim.beta2_at_batch`)."""
BETA2_SEARCH_BATCHES = (16, 64)
"""Batches whose lr search also tries the rule's beta2 (every method alike); at 256 the two are one."""
SCALE_LRS = (1e-4,)
"""The temperature's own peak lrs that every cell's search tries at the grid's best (lr, beta2): the
FastCLIP family's separate temperature lr (the recipes' ``optimizer.logit_scale_lr``). Without one
the logit scale is a gain like the others, stepped at the encoders' lr."""
CONVERGED_EPOCHS = {"emoji": 96, "fashion": 12, "glyphs": 96}
"""Epochs per dataset at which CLIP at B = 256 has converged on validation (``--epochs converged``).

From the convergence stage (seed 0, lr chosen at 12 epochs): doubling the training from these
epochs gains CLIP at B = 256 at most 0.015 R@1 (emoji 0.284 -> 0.299, glyphs 0.417 -> 0.426 from 96
to 192 epochs), and on fashion its zero-shot accuracy peaks at 12 epochs (0.832; 0.830 at 24,
0.822 at 48). Checked again at the converged search's setting (emoji: the temperature's own lr):
0.309 -> 0.319 from 96 to 192 epochs."""


def epochs_of(epochs, dataset: str) -> int:
    """The epochs of ``dataset`` under ``epochs`` (one int for every dataset, or a dict by dataset)."""
    if isinstance(epochs, int):
        return epochs
    if dataset not in epochs:
        raise ValueError(f"no epochs given for dataset {dataset!r} (have: {', '.join(epochs)})")
    return epochs[dataset]


def parse_epochs(tokens: Sequence[str], datasets: Sequence[str]) -> dict[str, int]:
    """``--epochs`` as epochs per dataset: ``12`` (every dataset), ``emoji=96 fashion=12`` (each
    named; the others take a bare number if one is given) or ``converged`` (:data:`CONVERGED_EPOCHS`)."""
    out: dict[str, int] = {}
    default: Optional[int] = None
    for t in tokens:
        if t == "converged":
            out.update(CONVERGED_EPOCHS)
        elif "=" in t:
            name, _, value = t.partition("=")
            if name not in DATASET_NAMES:
                raise ValueError(f"--epochs {t!r}: unknown dataset {name!r}; valid: {', '.join(DATASET_NAMES)}")
            out[name] = int(value)
        else:
            default = int(t)
    missing = [d for d in datasets if d not in out and default is None]
    if missing:
        raise ValueError(f"--epochs: no epochs for {', '.join(missing)}")
    bad = {d: e for d, e in out.items() if e < 1}
    if bad or (default is not None and default < 1):
        raise ValueError(f"--epochs: epochs must be >= 1, got {bad or default}")
    return {d: out.get(d, default) for d in datasets}


_LIN = {"name": "linearized", "pos_weight": 0.001}
METHODS: dict[str, dict[str, Any]] = {
    # name -> {"loss": the recipe's loss section, "init_scale": log s at init, "init_bias": b or None}
    "clip": {"loss": {"objective": "infonce"}},
    "siglip": {"loss": {"objective": "sigmoid"}, "init_scale": math.log(10.0), "init_bias": -10.0},
    "sogclr": {"loss": {"objective": _LIN, "estimator": {"name": "moving_average", "gamma": 0.9,
                                                         "init": "first_batch"}}},
    "fastclip": {"loss": {"objective": _LIN, "rho": 6.5,
                          "estimator": {"name": "moving_average", "init": "first_batch",
                                        "gamma": {"name": "cosine_decay", "start": 1.0, "end": 0.2,
                                                  "decay_epochs": "half"}}}},
    # SCENT: FastCLIP's run with the state-dependent weight (recipes/scent-*.yaml: alpha 10, reference positive)
    "scent": {"loss": {"objective": _LIN, "rho": 6.5, "estimator": {"name": "scent", "alpha": 10.0}}},
    # DCL: InfoNCE without the positive in its own normaliser
    "dcl": {"loss": {"objective": "dcl"}},
    # the shipped small-batch recipes' loss sections, adapted to the run by adapt_small_batch
    "amorlip": {"loss": "recipe", "recipe": "amorlip-small-batch.yaml"},
    "neuclip": {"loss": "recipe", "recipe": "neuclip-small-batch.yaml", "needs": "neuclip"},
}
"""The methods as ``loss:`` sections (``"recipe"``: the ``loss:`` section of ``recipes/<recipe>``).
``needs``: an estimator that must be registered for the row to run."""


def available_methods() -> list[str]:
    """The methods of :data:`METHODS` whose estimators are registered here."""
    from amortize.estimators import ESTIMATORS

    names = set(ESTIMATORS)
    return [m for m, spec in METHODS.items() if spec.get("needs") is None or spec["needs"] in names]


def recipe_loss_section(path: Path = SMALL_BATCH_RECIPE) -> dict:
    """The ``loss:`` section of a recipe file as written (what a run's key records), read by the
    recipe loader, which checks and binds the whole recipe first: a recipe with a bad key or value
    is refused naming it. Read again when the file changes."""
    path = Path(path)
    return copy.deepcopy(_recipe_loss(str(path.resolve()), path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=None)
def _recipe_loss(path: str, mtime_ns: int) -> dict:
    from amortize.train.config import load_recipe
    from amortize.textfiles import read_recipe_text, read_yaml

    load_recipe(path)  # the recipe checked and every section bound (nothing built)
    return read_yaml(read_recipe_text(Path(path)))["loss"]


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and "name" not in v:
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def adapt_small_batch(section: dict, batch: int, epochs: int, steps_per_epoch: int) -> dict:
    """The small-batch recipe's loss section for a run of ``epochs`` epochs at ``batch``.

    What the recipe knows replaces what the YAML fixed for its own run (batch 16, 20 epochs):
    the amortizer's initial bias is ``log batch`` (the in-batch sums start near it) and the
    previous-epoch blend's warm-up is a quarter of the run.
    """
    sec = copy.deepcopy(section)
    est = sec.get("estimator")
    while isinstance(est, dict) and isinstance(est.get("inner"), dict):  # a wrapper (exact_positive): its inner
        est = est["inner"]
    if isinstance(est, dict) and est.get("name") == "amortized":
        amort = est.get("amortizer")
        if isinstance(amort, dict):
            amort["init_log_z"] = math.log(batch)
        beta = est.get("beta")
        if isinstance(beta, dict) and beta.get("name") == "beta_warmup":
            beta["warmup_epochs"] = max(1, round(epochs / 4))
    return sec


def method_section(method: str, batch: int, epochs: int, steps_per_epoch: int,
                   overrides: Optional[dict] = None) -> tuple[dict, float, Optional[float]]:
    """``(loss section, initial log s, initial bias)`` of a method for one run.

    ``overrides`` (a variant) is merged into the section (``{"estimator": {"lr": 0.02}}``; a
    nested dict with a ``name`` replaces the whole sub-section); its ``logit_scale_lr``, if any, is
    the optimiser's and is left to :func:`train`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    spec = METHODS[method]
    sec = spec["loss"]
    if sec == "recipe":
        sec = adapt_small_batch(recipe_loss_section(RECIPES / spec["recipe"]), batch, epochs, steps_per_epoch)
    sec = copy.deepcopy(sec)
    est = sec.get("estimator")
    if isinstance(est, dict) and isinstance(est.get("gamma"), dict) and est["gamma"].get("decay_epochs") == "half":
        est["gamma"]["decay_epochs"] = max(1, epochs // 2)
    if overrides:
        overrides = dict(overrides)
        wrap = overrides.pop("wrap", None)
        overrides.pop("logit_scale_lr", None)  # the optimiser's, not the loss section's (see train)
        sec = _merge(sec, overrides)
        if wrap is not None:  # the recipe's estimator becomes the inner estimator of a wrapper
            sec["estimator"] = {"name": wrap, "inner": sec["estimator"]}
    return sec, spec.get("init_scale", CLIP_SCALE), spec.get("init_bias")


def bind_loss(section: dict):
    """A run's ``loss:`` section (a method's, adapted, with a variant's overrides merged in) checked
    by the recipe binder, as a recipe's ``loss:`` is at load: the recipe of that section alone,
    its sections bound (nothing built). A typo anywhere the binder reads (``loss.rhoo``,
    ``loss.estimator.lrr``, ``loss.objective.pos_weigt``) is refused naming its dotted key."""
    from amortize.train.config import load_recipe_dict

    return load_recipe_dict({"loss": copy.deepcopy(section)})


def build_loss(section: dict, num_samples: int, dim: int):
    """The :class:`~amortize.losses.ContrastiveLoss` of a ``loss:`` section, bound by :func:`bind_loss`
    and built from its bound sections as ``amortize train`` builds a recipe's
    (:func:`amortize.train.builders.build_loss`: ``dim`` and ``num_samples`` offered to the estimator)."""
    from amortize.train.builders import build_loss as build_recipe_loss

    return build_recipe_loss(bind_loss(section), dim, num_samples)


# ------------------------------------------------------------------------------------------ variants

VARIANTS: dict[str, dict] = {
    # AmorLIP estimator suspects (validation only); each is an override of the adapted recipe section
    "recipe": {},
    "rho_6.5": {"rho": {"name": "piecewise", "values": [6.5, 6.5, 6.5, -8.0]}},
    "reinit_never": {"estimator": {"reinit": "never"}},
    "cadence_global": {"estimator": {"cadence": "global"}},
    "fit_every_8": {"estimator": {"update_every": 8}},
    "ema_every_1": {"estimator": {"ema_every": 1, "ema_decay": 0.99}},
    "inner_lr_1e-3": {"estimator": {"lr": 0.001}},
    "inner_lr_2e-2": {"estimator": {"lr": 0.02}},
    "init_log_z_0": {"estimator": {"amortizer": {"init_log_z": 0.0}}},
    "reverse_kl": {"estimator": {"objective": "reverse_kl"}},
    "pos_weight_1": {"objective": {"name": "linearized", "pos_weight": 1.0}},  # the positive in the partition, as InfoNCE
    "beta_0": {"estimator": {"beta": 0.0}},
    "beta_0.5": {"estimator": {"beta": {"final": 0.5}}},
    "beta_0.8": {"estimator": {"beta": {"final": 0.8}}},  # the recipe before the suite (the paper's beta_T)
    "ema_target": {"estimator": {"normalizer": "ema_target"}},
    "in_batch_control": {"estimator": {"name": "in_batch"}},
    # the in-batch estimator with the positive in the partition: InfoNCE's gradient through the linearized objective
    "in_batch_pos_weight_1": {"estimator": {"name": "in_batch"}, "objective": {"name": "linearized", "pos_weight": 1.0}},
    # the positive's term exact (c = 1, as InfoNCE), the amortizer fitting the negatives' sums only
    "exact_positive": {"wrap": "exact_positive", "objective": {"name": "linearized", "pos_weight": 1.0}},
    **{f"exact_positive_c{c}": {"wrap": "exact_positive", "objective": {"name": "linearized", "pos_weight": c}}
       for c in (0.3, 0.1, 0.03, 0.01)},
    "pos_weight_0.03": {"objective": {"name": "linearized", "pos_weight": 0.03}},  # c = 0.03, the positive fitted
    # SCENT's small-batch setting (--variant-method scent): alpha, and the frame its weight is read in
    **{f"alpha_{a:g}": {"estimator": {"alpha": a}} for a in (0.0, 5.0, 20.0)},
    "reference_none": {"estimator": {"reference": "none"}},
    # NeuCLIP's temperature (--variant-method neuclip): the robust global contrastive loss's gradient
    # (loss.temperature: robust), which holds the mean log-normaliser ratio our rescaling leaves out
    # (its equilibrium: rho = the two sides' sum of log N - H(p), at most 2 log 15 = 5.4 at B = 16)
    **{f"robust_rho_{r:g}": {"rho": r, "temperature": "robust"} for r in (0.0, 1.0, 1.5, 2.0, 4.0, 6.5)},
    # ... with the FastCLIP family's own temperature lr (the recipes' optimizer.logit_scale_lr, 1e-4;
    # the suite otherwise steps the logit scale at the encoders' lr, for every method alike)
    **{f"robust_rho_{r:g}_scale_lr_{lr:g}": {"rho": r, "temperature": "robust", "logit_scale_lr": lr}
       for r in (1.0, 2.0) for lr in (1e-4, 3e-4)},
    # ... with the restarted prototypes' AdaGrad sums reset (the recipe keeps every sum: reset_optimizer none)
    "robust_rho_2_reset_restarted": {"rho": 2.0, "temperature": "robust",
                                     "estimator": {"restart": {"reset_optimizer": "restarted"}}},
    # NeuCLIP's capacity: four times the prototypes (the small-batch recipe has 256)
    "prototypes_1024": {"estimator": {"num_prototypes": 1024}},
}


# ------------------------------------------------------------------------------------------ runs


@dataclass
class Run:
    """One training run of the suite."""

    dataset: str
    method: str
    batch: int
    seed: int
    split: str = "val"
    lr: Optional[float] = None  # None: base_lr(batch)
    epochs: int = EPOCHS
    variant: str = ""
    overrides: dict = field(default_factory=dict)
    max_steps: Optional[int] = None
    beta2: Optional[float] = None  # None: BETA2
    logit_scale_lr: Optional[float] = None  # None: the encoders' lr (or a variant's ``logit_scale_lr``)

    def key(self) -> str:
        """A key that identifies the run in a jsonl file (runs at the default beta2 and scale lr keep the keys they had)."""
        d = asdict(self)
        d.pop("max_steps")
        for k in ("beta2", "logit_scale_lr"):
            if d[k] is None:
                d.pop(k)
        spec = METHODS[self.method]
        if spec["loss"] == "recipe":  # a changed recipe is a different run
            d["recipe"] = recipe_loss_section(RECIPES / spec["recipe"])
        return json.dumps(d, sort_keys=True)

    def scale_lr(self) -> Optional[float]:
        """The logit scale's own peak lr: the run's, else its variant's, else None (the encoders' lr)."""
        return _scale_lr(self.logit_scale_lr, self.overrides)

    def tag(self) -> str:
        """The method, with the variant in brackets."""
        return f"{self.method}[{self.variant}]" if self.variant else self.method


def _scale_lr(own: Optional[float], overrides: Optional[dict]) -> Optional[float]:
    """:meth:`Run.scale_lr` of a run's ``logit_scale_lr`` and ``overrides`` (a run's or a row's)."""
    return own if own is not None else (overrides or {}).get("logit_scale_lr")


def base_lr(batch: int) -> float:
    """The centre of the lr grid: ``2e-3 * sqrt(batch / 16)`` (CLIP's best on the emoji benchmark)."""
    return 2e-3 * math.sqrt(batch / 16)


def rule_beta2(batch: int) -> float:
    """The beta2 that keeps :data:`BETA2`'s half-life in samples at ``batch`` (0.99874 at 16, 0.99496 at 64)."""
    from amortize.train.optim import beta2_at_batch

    return beta2_at_batch(BETA2, BETA2_REFERENCE_BATCH, batch)


@torch.no_grad()
def evaluate(model: SmallTwoTower, data, split: str) -> dict[str, float]:
    """The dataset's metric on ``split`` as ``{"quality": ..., ...}``."""
    from amortize.eval.retrieval import retrieval_metrics

    s = data.splits[split]
    x, y = encode_split(model, s)
    if data.metric == "zeroshot":
        C, P, L = data.class_tokens.shape
        t = model.encode_text(data.class_tokens.view(C * P, L)).view(C, P, -1).mean(1)
        t = torch.nn.functional.normalize(t, dim=-1)
        acc = float(((x @ t.T).argmax(1) == data.labels[split]).float().mean())
        return {"quality": acc, "zeroshot_top1": acc}
    m = retrieval_metrics(x, y, torch.arange(len(s)), ks=(1, 10))
    return {"quality": m["mean_R@1"], "mean_R@1": m["mean_R@1"],
            "mean_R@10": 0.5 * (m["image_to_text_R@10"] + m["text_to_image_R@10"])}


@torch.no_grad()
def normaliser_error(model: SmallTwoTower, loss_fn, split, batch: int, rows: int = 1024, rounds: int = 8,
                     seed: int = 1234) -> dict[str, float]:
    """Log-space RMSE of the encoder normaliser and of the in-batch sums against the exact partition.

    The exact partition of row ``i`` at this batch over the whole training set is
    ``log((B-1)/(N-1) sum_{j != i} exp(S_ij) + c exp(S_ii))`` (what the in-batch sum estimates).
    The estimator is queried in eval mode (its state does not change) on ``rounds`` random batches
    drawn from ``rows`` random training rows. Empty for objectives without a normaliser.
    """
    from amortize.estimators.base import declared_inputs

    est = loss_fn.estimator
    obj = loss_fn.objective
    if not getattr(obj, "accepts_normalizers", False):
        return {}
    c = obj.partition_weight()
    x, y = encode_split(model, split)
    n = x.shape[0]
    s = float(model.logit_scale.exp())
    g = torch.Generator().manual_seed(seed)
    sub = torch.randperm(n, generator=g)[: min(rows, n)]
    ar = torch.arange(len(sub))
    off = math.log((batch - 1) / (n - 1))
    log_c = math.log(c) if c > 0 else -math.inf  # c = 0: the positive left out (NeuCLIP)
    # what the estimator declares it reads, as the loss gives it on one process
    extra = declared_inputs(est, model.logit_scale.exp().detach(), None, float(batch - 1), False, c,
                            topology=loss_fn.layout.topology)

    def exact(a, b):  # rows a[sub] against all of b
        S = s * (a[sub] @ b.T) + off
        S[ar, sub] = s * (a[sub] * b[sub]).sum(1) + log_c
        return torch.logsumexp(S, 1)

    ref_x, ref_y = exact(x, y), exact(y, x)
    was = est.training if est is not None else False
    if est is not None:
        est.eval()
    e_est, e_b = [], []
    try:
        for _ in range(rounds):
            p = torch.randperm(len(sub), generator=g)[:batch]
            idx = sub[p]
            S = s * (x[idx] @ y[idx].T)
            S.diagonal().add_(log_c)
            lzx, lzy = torch.logsumexp(S, 1), torch.logsumexp(S, 0)
            if est is not None:
                out = est(x[idx], y[idx], lzx, lzy, idx, **extra)
                nx, ny = out.log_norm_x, out.log_norm_y
            else:
                nx, ny = lzx, lzy
            e_est.append(0.5 * ((nx - ref_x[p]).square().mean() + (ny - ref_y[p]).square().mean()))
            e_b.append(0.5 * ((lzx - ref_x[p]).square().mean() + (lzy - ref_y[p]).square().mean()))
    finally:
        if est is not None:
            est.train(was)
    return {"norm_err": float(torch.stack(e_est).mean().sqrt()), "batch_err": float(torch.stack(e_b).mean().sqrt())}


def train(run: Run, data=None) -> dict:
    """Train one model and evaluate it on ``run.split``; returns the run's row (with per-epoch diagnostics)."""
    from amortize.diagnostics import EstimatorMonitor
    from studies.suite_data import build

    torch.manual_seed(run.seed)
    data = data or build(run.dataset)
    tr = data.splits["train"]
    n = len(tr)
    spe = n // run.batch
    section, ls0, lb0 = method_section(run.method, run.batch, run.epochs, spe, run.overrides)
    loss_fn = build_loss(section, n, 64)
    model = SmallTwoTower(data.pixels, data.vocab_size, init_logit_scale=ls0, init_logit_bias=lb0)
    lr = run.lr or base_lr(run.batch)
    monitor = EstimatorMonitor(warn=False)  # verdicts go to the row's "warnings"
    ratios: list[torch.Tensor] = []

    def hook(module, args, out):  # log(Z_batch / lambda) of every row: the gradient-weight spread
        if module.training:
            ratios.append(torch.cat([args[2] - out.log_norm_x, args[3] - out.log_norm_y]).detach())

    if loss_fn.estimator is not None:
        loss_fn.estimator.register_forward_hook(hook)
        monitor.attach(loss_fn.estimator)
    per_epoch: list[dict] = []
    diag_every = max(1, run.epochs // 24)  # the normaliser's error at most ~24 times a run (and at its end)

    def start(epoch: int) -> None:
        monitor.start_epoch(epoch)
        ratios.clear()

    def diagnose(epoch: int, steps: int, out: dict) -> None:
        if not torch.isfinite(out["loss"]):
            raise FloatingPointError(f"{run.key()}: non-finite loss in epoch {epoch}")
        e = {"epoch": epoch, "scale": float(model.logit_scale.exp())}
        if ratios:
            r = torch.cat(ratios)
            e.update(w_mean=float(r.mean()), w_sd=float(r.std()) if r.numel() > 1 else 0.0)
        if (epoch + 1) % diag_every == 0 or epoch + 1 == run.epochs:
            model.eval()
            e.update(normaliser_error(model, loss_fn, tr, run.batch))
            model.train()
        e.update(monitor.end_epoch() or {})
        per_epoch.append(e)

    done = train_loop(model, loss_fn, tr, batch=run.batch, epochs=run.epochs, lr=lr, seed=run.seed,
                      beta2=run.beta2 or BETA2, scale_lr=run.scale_lr(),
                      max_steps=run.max_steps, on_epoch_start=start,
                      on_epoch_end=diagnose)
    step, wall = done.steps, done.wall_s
    model.eval()
    row = {**asdict(run), "key": run.key(), "tag": run.tag(), "lr": lr, "beta2": run.beta2 or BETA2, "steps": step,
           "wall_s": wall,
           "section": section, "epochs_log": per_epoch, "warnings": monitor.warnings}
    row.update(evaluate(model, data, run.split))
    for other in ("val", "test"):  # the same model on the other split: a seed's lr-search run is its test run
        if other != run.split:
            row[f"quality_{other}"] = evaluate(model, data, other)["quality"]
    last = per_epoch[-1] if per_epoch else {}
    for k in ("scale", "norm_err", "batch_err", "w_mean", "w_sd"):
        if k in last:
            row[k] = last[k]
    return row


def _worker(run: Run) -> dict:
    torch.set_num_threads(1)
    try:
        os.nice(15)
    except OSError:
        pass
    return train(run)


def is_current(row: dict) -> bool:
    """False for a row of a method read from a recipe file (:data:`METHODS`) that was run with another
    version of that recipe's ``loss:`` section: it measured a method the suite no longer runs."""
    spec = METHODS.get(row["method"], {})
    if spec.get("loss") != "recipe":
        return True
    return json.loads(row["key"]).get("recipe") == recipe_loss_section(RECIPES / spec["recipe"])


def read_rows(path: Path) -> list[dict]:
    """Every row of a jsonl file as written (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_rows(path: Path) -> dict[str, dict]:
    """The rows of a jsonl file by key (later lines win), less those of a recipe since changed (:func:`is_current`)."""
    rows = {r["key"]: r for r in read_rows(path)}
    return {k: r for k, r in rows.items() if is_current(r)}


SPLIT_METRICS = ("mean_R@1", "mean_R@10", "zeroshot_top1")
"""What :func:`evaluate` measures on one split besides ``quality`` (a row holds them for its own split only)."""


def _trained(method, dataset, batch, seed, lr, epochs, beta2, scale_lr, max_steps, section) -> str:
    return json.dumps([method, dataset, batch, seed, lr, epochs, beta2, scale_lr, max_steps, section],
                      sort_keys=True, default=str)


def trained_as(run: Run) -> str:
    """What ``run`` trains: equal for two runs that train the same model (method, data, batch, seed,
    budget, optimiser, and the loss section after adaptation and overrides). The split (every run
    evaluates both), the variant's name and the recipe's other text are not part of it."""
    section = method_section(run.method, run.batch, run.epochs, 0, run.overrides)[0]
    return _trained(run.method, run.dataset, run.batch, run.seed, run.lr or base_lr(run.batch), run.epochs,
                    run.beta2 or BETA2, run.scale_lr(), run.max_steps, section)


def row_trained_as(row: dict) -> Optional[str]:
    """:func:`trained_as` of the run a row recorded (None for a row without its section)."""
    if "section" not in row:
        return None
    return _trained(row["method"], row["dataset"], row["batch"], row["seed"], row["lr"], row["epochs"],
                    _beta2(row), _scale_lr(row.get("logit_scale_lr"), row.get("overrides")), row.get("max_steps"),
                    row["section"])


def reuse_trained(recorded: Iterable[dict], runs: Sequence[Run], jsonl: Path) -> int:
    """Write into ``jsonl`` the rows of ``runs`` that the study has already trained, and return how many.

    A recorded row that trained the same model (:func:`trained_as`) is copied under the run's key,
    with the run's fields, its quality read on the run's split, and ``reused_from`` naming the row:
    a validation run is the test run of its seed, and a variant is the run of the method whose recipe
    took it on. Across splits only ``quality`` carries over (:data:`SPLIT_METRICS` are dropped).
    """
    have = load_rows(jsonl)
    todo = [r for r in runs if r.key() not in have]
    if not todo:
        return 0
    by: dict[str, dict] = {}
    for r in recorded:
        sig = row_trained_as(r)
        if sig is not None:
            by.setdefault(sig, r)
    n = 0
    for run in todo:
        src = by.get(trained_as(run))
        if src is None:
            continue
        same_split = src["split"] == run.split
        quality = src["quality"] if same_split else src.get(f"quality_{run.split}")
        if quality is None:
            continue
        row = {**src, **asdict(run), "lr": src["lr"], "beta2": _beta2(src), "tag": run.tag(),
               "key": run.key(), "quality": quality, "reused_from": src["key"]}
        if not same_split:
            for m in (*SPLIT_METRICS, f"quality_{run.split}"):
                row.pop(m, None)
            row[f"quality_{src['split']}"] = src["quality"]
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        have[row["key"]] = row
        n += 1
    return n


def check_sections(runs: Sequence[Run]) -> None:
    """Bind the loss section of every run (each distinct one once) before any of them trains: a typo
    in a method or a variant's overrides is refused at once, naming its key (:func:`bind_loss`)."""
    seen: set[str] = set()
    for r in runs:
        section = method_section(r.method, r.batch, r.epochs, 0, r.overrides)[0]
        k = json.dumps(section, sort_keys=True, default=str)
        if k not in seen:
            seen.add(k)
            bind_loss(section)


def run_all(runs: Sequence[Run], jsonl: Path, jobs: int = 2, log=print, reuse_from: Sequence[Path] = ()) -> list[dict]:
    """Run what ``jsonl`` does not hold yet (``jobs`` processes, one thread each, niced); append rows as
    they finish. A run that a row of the files ``reuse_from`` already trained is not trained again
    (:func:`reuse_trained`)."""
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    if reuse_from:
        n = reuse_trained([r for p in reuse_from for r in read_rows(p)], runs, jsonl)
        if n:
            log(f"{n} runs already trained elsewhere in the study: their rows reused in {jsonl.name}")
    done = load_rows(jsonl)
    todo = [r for r in runs if r.key() not in done]
    check_sections(todo)
    log(f"{len(runs) - len(todo)} of {len(runs)} runs already in {jsonl.name}; {len(todo)} to go")

    def finish(row: dict) -> None:
        done[row["key"]] = row
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log(f"{row['dataset']:8s} {row['tag']:24s} B={row['batch']:3d} s={row['seed']} lr={row['lr']:.2g} "
            f"{row['split']} q={row['quality']:.4f} err={row.get('norm_err', float('nan')):.2f}/"
            f"{row.get('batch_err', float('nan')):.2f} scale={row['scale']:.1f} {row['wall_s']:.0f}s"
            + (" WARN" if row["warnings"] else ""))

    if jobs <= 1:
        torch.set_num_threads(1)
        for r in todo:
            finish(train(r))
    else:
        with ProcessPoolExecutor(jobs) as ex:
            for f in as_completed([ex.submit(_worker, r) for r in todo]):
                finish(f.result())
    return [done[r.key()] for r in runs]


# ------------------------------------------------------------------------------------------ stages


def lr_runs(datasets, methods, batches, epochs, mults=LR_MULTS, beta2_batches=BETA2_SEARCH_BATCHES) -> list[Run]:
    """The lr grid on validation, seed 0 (the largest batch first: its runs are the cheapest); at
    ``beta2_batches`` every lr also with the rule's beta2 (:func:`rule_beta2`), after the default's."""
    return [Run(d, m, b, 0, "val", lr=base_lr(b) * k, epochs=epochs_of(epochs, d), beta2=b2)
            for b in sorted(batches, reverse=True)
            for b2 in ((None, rule_beta2(b)) if b in beta2_batches else (None,))
            for d in datasets for m in methods for k in mults]


def scale_lr_runs(grid_rows: Sequence[dict], scale_lrs: Sequence[float] = SCALE_LRS) -> list[Run]:
    """The temperature-lr arm of the search: each cell of ``grid_rows`` (an lr stage's grid, seed 0 on
    validation) at its best ``(lr, beta2)`` once more with each of ``scale_lrs`` as the logit scale's
    own lr; :func:`chosen_setting` then chooses among all of them."""
    grid = [r for r in grid_rows if r.get("logit_scale_lr") is None]
    cellset = sorted({(r["dataset"], r["method"], r["batch"], r["epochs"]) for r in grid
                      if r["split"] == "val" and not r["variant"] and r["seed"] == 0},
                     key=lambda c: (-c[2], list(METHODS).index(c[1]) if c[1] in METHODS else 99,
                                    DATASET_NAMES.index(c[0]) if c[0] in DATASET_NAMES else 99))
    out = []
    for d, m, b, e in cellset:
        lr, b2, _ = chosen_setting(grid, d, m, b, e)
        out += [Run(d, m, b, 0, "val", lr=lr, epochs=e, beta2=b2, logit_scale_lr=sl) for sl in scale_lrs]
    return out


def _beta2(row: dict) -> float:
    return row.get("beta2") or BETA2


def chosen_setting(rows: Sequence[dict], dataset: str, method: str, batch: int,
                   epochs: Optional[int] = None) -> Optional[tuple[float, Optional[float], Optional[float]]]:
    """The best validation ``(lr, beta2, logit_scale_lr)`` of a (dataset, method, batch) cell, or None;
    ties: the smaller lr, then the default beta2, then the scale at the encoders' lr; ``beta2`` is
    None for the default (:data:`BETA2`), ``logit_scale_lr`` None for the encoders' lr;
    ``epochs``: among the runs of that many epochs only."""
    cand = [r for r in rows if r["dataset"] == dataset and r["method"] == method and r["batch"] == batch
            and r["split"] == "val" and not r["variant"] and r["seed"] == 0
            and (epochs is None or r["epochs"] == epochs)]
    if not cand:
        return None
    best = max(cand, key=lambda r: (round(r["quality"], 6), -r["lr"], _beta2(r) == BETA2,
                                    r.get("logit_scale_lr") is None))
    return setting_of(best)


def setting_of(row: dict) -> tuple[float, Optional[float], Optional[float]]:
    """A row's ``(lr, beta2, logit_scale_lr)`` as :func:`chosen_setting` gives it (None for a default)."""
    return row["lr"], (None if _beta2(row) == BETA2 else _beta2(row)), row.get("logit_scale_lr")


def at_setting(lr_rows, dataset: str, method: str, batch: int, epochs: int) -> dict:
    """The :class:`Run` fields ``lr``, ``beta2``, ``logit_scale_lr`` of the cell's chosen setting at
    ``epochs`` (:func:`chosen_setting`); a cell without a search: :func:`base_lr` and the defaults."""
    return run_fields(chosen_setting(lr_rows, dataset, method, batch, epochs) or (base_lr(batch), None, None))


def run_fields(setting: tuple[float, Optional[float], Optional[float]]) -> dict:
    """A ``(lr, beta2, logit_scale_lr)`` setting as the :class:`Run` fields of those names."""
    return dict(zip(("lr", "beta2", "logit_scale_lr"), setting))


def chosen_lr(rows: Sequence[dict], dataset: str, method: str, batch: int,
              epochs: Optional[int] = None) -> Optional[float]:
    """The lr of :func:`chosen_setting`, or None."""
    got = chosen_setting(rows, dataset, method, batch, epochs)
    return None if got is None else got[0]


def test_runs(lr_rows, datasets, methods, batches, seeds, epochs, scale_from: Optional[int] = None) -> list[Run]:
    """Test-split runs at the chosen setting (lr, beta2, logit_scale_lr) of each cell (cells without one are skipped).

    ``scale_from``: for a cell without an lr search, the lr chosen at batch ``scale_from`` times
    ``sqrt(batch / scale_from)`` (the rule of :func:`base_lr`), at the default beta2 and scale lr.
    """
    out = []
    for s in seeds:
        for b in sorted(batches):
            for d in datasets:
                for m in methods:
                    e = epochs_of(epochs, d)
                    got = chosen_setting(lr_rows, d, m, b, e)
                    if got is None and scale_from is not None:
                        lr0 = chosen_lr(lr_rows, d, m, scale_from, e)
                        got = None if lr0 is None else (lr0 * math.sqrt(b / scale_from), None, None)
                    if got is not None:
                        out.append(Run(d, m, b, s, "test", epochs=e, **run_fields(got)))
    return out


def test_priority(run: Run) -> tuple:
    """The test stage's order, so that a cut-short run has the rows that matter most: the smallest
    batch (the headline comparison), then the largest (the converged reference), then the others;
    within one, CLIP and AmorLIP first (the comparison of issue 21's done-when), the longest runs first."""
    rank = {min(BATCHES): 0, max(BATCHES): 1}.get(run.batch, 2)
    return (rank, run.method not in ("clip", "amorlip"), -run.epochs, run.seed, run.method != "amorlip")


def variant_run(lr_rows, dataset: str, method: str, batch: int, seed: int, split: str, epochs: int,
                variant: str) -> Run:
    """``method``'s ``variant`` at the method's chosen setting of the cell (a variant that gives the
    logit scale its own lr keeps it)."""
    over = VARIANTS[variant]
    at = at_setting(lr_rows, dataset, method, batch, epochs)
    if "logit_scale_lr" in over:
        at["logit_scale_lr"] = None
    return Run(dataset, method, batch, seed, split, epochs=epochs, variant=variant, overrides=over, **at)


def variant_runs(lr_rows, datasets, variants, batch, seeds, epochs, method: str = "amorlip") -> list[Run]:
    """``method``'s variants on validation at its chosen setting (CLIP's reference rows come from the lr stage)."""
    out = []
    for s in seeds:
        for d in datasets:
            e = epochs_of(epochs, d)
            for v in variants:
                out.append(variant_run(lr_rows, d, method, batch, s, "val", e, v))
            if s != 0:  # seed 0 of CLIP at its chosen setting is in the lr stage
                out.append(Run(d, "clip", batch, s, "val", epochs=e, **at_setting(lr_rows, d, "clip", batch, e)))
    return out


def convergence_runs(lr_rows, datasets, methods=("clip", "amorlip"), batches=(256, 16),
                     epochs=(24, 48), max_small_epochs=24, suite_epochs=EPOCHS) -> list[Run]:
    """Is the epoch budget enough? ``methods`` on validation at seed 0, each at its lr chosen at the
    suite's epochs (``suite_epochs``), trained ``epochs`` (at most ``max_small_epochs`` at the
    smallest batch, whose runs cost the most); the suite's own epochs are its lr-stage rows. Each run
    takes the whole chosen setting (:func:`at_setting`: lr, beta2, the temperature's lr)."""
    small = min(batches)
    return [Run(d, m, b, 0, "val", epochs=e, **at_setting(lr_rows, d, m, b, epochs_of(suite_epochs, d)))
            for e in epochs for b in batches for d in datasets for m in methods
            if not (b == small and e > max_small_epochs)]


def long_runs(lr_rows, datasets, seeds, batch=16, epochs=24, methods=("clip", "amorlip"),
              suite_epochs=EPOCHS) -> list[Run]:
    """The headline comparison trained longer: ``methods`` at ``batch`` on the test split, each at its
    setting chosen at the suite's epochs (``suite_epochs``, :func:`at_setting`)."""
    return [Run(d, m, batch, s, "test", epochs=epochs, **at_setting(lr_rows, d, m, batch, epochs_of(suite_epochs, d)))
            for s in seeds for d in datasets for m in methods]


# ------------------------------------------------------------------------------------------ report


def _ms(v: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def cells(rows: Sequence[dict]) -> dict[tuple[str, str, int], dict]:
    """(dataset, tag, batch) -> mean, sd, n, seeds -> quality, mean diagnostics."""
    by: dict[tuple[str, str, int], list[dict]] = {}
    for r in rows:
        by.setdefault((r["dataset"], r["tag"], r["batch"]), []).append(r)
    out = {}
    for k, rs in by.items():
        m, sd = _ms([r["quality"] for r in rs])
        c = {"mean": m, "sd": sd, "n": len(rs), "by_seed": {r["seed"]: r["quality"] for r in rs},
             "lr": rs[0]["lr"], "beta2": _beta2(rs[0]), "logit_scale_lr": rs[0].get("logit_scale_lr")}
        for d in ("norm_err", "batch_err", "w_mean", "w_sd", "scale"):
            vals = [r[d] for r in rs if d in r]
            if vals:
                c[d] = statistics.mean(vals)
        c["warned"] = sum(bool(r["warnings"]) for r in rs)
        out[k] = c
    return out


def vs_clip(cs: dict, dataset: str, tag: str, batch: int) -> Optional[tuple[float, float]]:
    """Paired (by seed) difference to CLIP at the same batch: mean, sd."""
    a, b = cs.get((dataset, tag, batch)), cs.get((dataset, "clip", batch))
    if not a or not b:
        return None
    d = [v - b["by_seed"][s] for s, v in a["by_seed"].items() if s in b["by_seed"]]
    return _ms(d) if d else None


def convergence_table(lr_rows: Sequence[dict], conv_rows: Sequence[dict]) -> str:
    """Validation quality against epochs (seed 0, each cell at its chosen setting: lr, beta2, scale
    lr): the lr stage's rows give the suite's own epochs, the convergence stage's the longer runs."""
    from benchmarks.common import markdown_table

    quality = {(r["dataset"], r["method"], r["batch"], setting_of(r), r["epochs"]): r["quality"]
               for r in (*lr_rows, *conv_rows) if r["split"] == "val" and not r["variant"] and r["seed"] == 0}
    epochs = sorted({k[4] for k in quality})
    body = []
    for d in DATASET_NAMES:
        for m in sorted({r["method"] for r in conv_rows}, key=list(METHODS).index):
            for b in sorted({r["batch"] for r in conv_rows}):
                got = chosen_setting(lr_rows, d, m, b)
                if got is not None:
                    q = [quality.get((d, m, b, got, e)) for e in epochs]
                    body.append([d, m, str(b), f"{got[0]:.2g}", "enc" if got[2] is None else f"{got[2]:.0e}"]
                                + ["-" if v is None else f"{v:.3f}" for v in q])
    return ("## Convergence (validation split, seed 0, setting chosen at the suite's epochs)\n\n"
            + markdown_table(["dataset", "method", "B", "lr", "scale lr"] + [f"{e} epochs" for e in epochs], body))


def markdown_report(rows: Sequence[dict], title: str = "") -> str:
    """One table per dataset (method x batch, with the difference to CLIP) and the average table."""
    from benchmarks.common import markdown_table

    cs = cells(rows)
    datasets = [d for d in DATASET_NAMES if any(k[0] == d for k in cs)]
    tags = sorted({k[1] for k in cs}, key=lambda t: (list(METHODS).index(t.split("[")[0]) if t.split("[")[0] in METHODS else 99, t))
    batches = sorted({k[2] for k in cs})
    parts = [title] if title else []
    for d in datasets:
        metric = "zero-shot top-1" if d == "fashion" else "mean R@1"
        head = ["method"] + [f"B={b}" for b in batches] + [f"vs CLIP B={b}" for b in batches] + ["lr (B=16/64/256)", "beta2 (B=16/64/256)", "scale lr (B=16/64/256)", "normaliser err B=16", "in-batch err B=16", "scale B=16"]
        body = []
        for t in tags:
            row = [t]
            def pm(m, sd, n, sign=""):
                return f"{m:{sign}.3f} ± {sd:.3f}" if n > 1 else f"{m:{sign}.3f} (1 seed)"

            row += [pm(cs[(d, t, b)]["mean"], cs[(d, t, b)]["sd"], cs[(d, t, b)]["n"]) if (d, t, b) in cs else "-"
                    for b in batches]
            for b in batches:
                v = vs_clip(cs, d, t, b)
                n = cs.get((d, t, b), {}).get("n", 0)
                row.append("-" if v is None or t == "clip" else pm(v[0], v[1], n, "+"))
            row.append(" / ".join(f"{cs[(d, t, b)]['lr']:.2g}" if (d, t, b) in cs else "-" for b in batches))
            row.append(" / ".join(f"{cs[(d, t, b)]['beta2']:.4g}" if (d, t, b) in cs else "-" for b in batches))
            row.append(" / ".join("-" if (d, t, b) not in cs else "enc" if cs[(d, t, b)]["logit_scale_lr"] is None
                                  else f"{cs[(d, t, b)]['logit_scale_lr']:.0e}" for b in batches))
            c16 = cs.get((d, t, batches[0]), {})
            row += [f"{c16[k]:.2f}" if k in c16 else "-" for k in ("norm_err", "batch_err")]
            row.append(f"{c16['scale']:.0f}" if "scale" in c16 else "-")
            body.append(row)
        split = "/".join(sorted({r["split"] for r in rows if r["dataset"] == d}))
        epochs = "/".join(str(e) for e in sorted({r["epochs"] for r in rows if r["dataset"] == d and "epochs" in r}))
        budget = f", {epochs} epochs" if epochs else ""
        parts.append(f"**{d}** ({metric}{budget}, {split} split, mean ± sd over seeds)\n\n" + markdown_table(head, body))
    if len(datasets) > 1:
        head = ["method"] + [f"mean over datasets B={b}" for b in batches] + [f"mean vs CLIP B={b}" for b in batches] + ["worst vs CLIP B=16"]
        body = []
        for t in tags:
            row = [t]
            for b in batches:
                v = [cs[(d, t, b)]["mean"] for d in datasets if (d, t, b) in cs]
                row.append(f"{statistics.mean(v):.3f}" if len(v) == len(datasets) else "-")
            for b in batches:
                v = [vs_clip(cs, d, t, b) for d in datasets]
                row.append(f"{statistics.mean(x[0] for x in v):+.3f}" if all(v) and t != "clip" else "-")
            v = [vs_clip(cs, d, t, batches[0]) for d in datasets]
            row.append(f"{min(x[0] for x in v):+.3f}" if all(v) and t != "clip" else "-")
            body.append(row)
        parts.append("**average over datasets**\n\n" + markdown_table(head, body))
    return "\n\n".join(parts) + "\n"


def plot(rows: Sequence[dict], path: Path) -> None:
    """Quality against batch size per method, one panel per dataset (error bars: sd over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = cells(rows)
    datasets = [d for d in DATASET_NAMES if any(k[0] == d for k in cs)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for t in sorted({k[1] for k in cs if k[0] == d}):
            bs = sorted(b for (dd, tt, b) in cs if dd == d and tt == t)
            ax.errorbar(bs, [cs[(d, t, b)]["mean"] for b in bs], yerr=[cs[(d, t, b)]["sd"] for b in bs],
                        marker="o", capsize=3, label=t, lw=2.2 if t.startswith("amorlip") else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(d)
        ax.set_ylabel("zero-shot top-1" if d == "fashion" else "mean R@1")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--stage", choices=("lr", "test", "variants", "convergence", "long", "report", "all"),
                   default="all")
    p.add_argument("--datasets", nargs="*", default=list(DATASET_NAMES))
    p.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    p.add_argument("--batches", type=int, nargs="*", default=list(BATCHES))
    p.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    p.add_argument("--epochs", nargs="*", default=[str(EPOCHS)],
                   help="epochs: one number for every dataset, dataset=N per dataset, or 'converged' "
                        "(CONVERGED_EPOCHS: where CLIP at B = 256 has converged)")
    p.add_argument("--lr-mults", type=float, nargs="*", default=list(LR_MULTS),
                   help="the lr grid, as multiples of base_lr(batch)")
    p.add_argument("--beta2-batches", type=int, nargs="*", default=list(BETA2_SEARCH_BATCHES),
                   help="batches whose lr search also tries the rule's beta2 (none: the default beta2 only)")
    p.add_argument("--scale-lrs", type=float, nargs="*", default=list(SCALE_LRS),
                   help="the logit scale's own lrs tried at each cell's best (lr, beta2) after the grid "
                        "(none: the scale at the encoders' lr only)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--variant-method", default="amorlip", help="the method the variants override")
    p.add_argument("--variant-seeds", type=int, nargs="*", default=[0, 1])
    p.add_argument("--test-variants", nargs="*", default=[],
                   help="variants of --variant-method also run on the test split (smallest batch, --seeds, the method's chosen setting), after the methods")
    p.add_argument("--scale-lr-from", type=int, default=None,
                   help="test cells without an lr search use the lr chosen at this batch, scaled by sqrt(B / it)")
    p.add_argument("--convergence-epochs", type=int, nargs="*", default=[24, 48],
                   help="epochs of the convergence stage (at most 24 at the smallest batch)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="transfer", help="results prefix results/studies/<out>*")
    p.add_argument("--quick", action="store_true", help="emoji, CLIP and AmorLIP, B 16 and 64, 2 epochs, seed 0")
    a = p.parse_args(argv)
    methods = a.methods or available_methods()
    try:
        epochs = parse_epochs(a.epochs, a.datasets)
    except ValueError as e:
        p.error(str(e))
    if a.quick:
        a.datasets, methods, a.batches, a.seeds = ["emoji"], ["clip", "amorlip"], [16, 64], [0]
        a.out = "transfer_quick"
        path = OUT / f"{a.out}.runs.jsonl"
        path.unlink(missing_ok=True)  # a quick run is always fresh
        rows = run_all([Run("emoji", m, b, 0, "test", epochs=2) for m in methods for b in a.batches], path, jobs=1)
        print(markdown_report(rows, "quick (2 epochs, seed 0, base lr)"))
        return
    lr_path, test_path, var_path = (OUT / f"{a.out}_{s}.runs.jsonl" for s in ("lr", "test", "variants"))
    study = (lr_path, test_path, var_path)  # a run one of them already trained is reused (reuse_trained)
    if a.stage in ("lr", "all"):
        grid = run_all(lr_runs(a.datasets, methods, a.batches, epochs, a.lr_mults, a.beta2_batches), lr_path,
                       a.jobs, reuse_from=study)
        run_all(scale_lr_runs(grid, a.scale_lrs), lr_path, a.jobs, reuse_from=study)
    lr_rows = list(load_rows(lr_path).values())
    if a.stage in ("test", "all"):
        runs = test_runs(lr_rows, a.datasets, methods, a.batches, a.seeds, epochs, a.scale_lr_from)
        b0 = min(a.batches)
        vm = a.variant_method
        runs += [variant_run(lr_rows, d, vm, b0, s, "test", epochs[d], v)
                 for s in a.seeds for d in a.datasets for v in a.test_variants]
        run_all(sorted(runs, key=test_priority), test_path, a.jobs, reuse_from=study)
    if a.stage in ("variants", "all"):
        run_all(variant_runs(lr_rows, a.datasets, a.variants, min(a.batches), a.variant_seeds, epochs,
                             a.variant_method), var_path, a.jobs, reuse_from=study)
    if a.stage == "convergence":  # not part of "all": a check of the epoch budget
        run_all(convergence_runs(lr_rows, a.datasets, epochs=a.convergence_epochs, suite_epochs=epochs),
                OUT / f"{a.out}_convergence.runs.jsonl", a.jobs)
    if a.stage == "long":
        run_all(long_runs(lr_rows, a.datasets, a.seeds, suite_epochs=epochs), OUT / f"{a.out}_long.runs.jsonl", a.jobs)
    if a.stage in ("report", "all"):
        report(a.out)


def at_chosen_lr(rows, lr_rows: Sequence[dict]) -> list[dict]:
    """``rows`` less those of a method (no variant) at another setting than its cell's chosen one: a
    search extended after a test stage moves the choice, and the runs at the old setting drop out."""
    keep = []
    for r in rows:
        got = None if r["variant"] else chosen_setting(lr_rows, r["dataset"], r["method"], r["batch"], r["epochs"])
        if got is None or got == setting_of(r):
            keep.append(r)
    return keep


def report(out: str = "transfer") -> None:
    """Write ``results/studies/<out>.md`` / ``.json`` and the plot ``docs/assets/<out>_batch.png`` from the jsonl files."""
    from benchmarks.common import write_json

    lr_rows = list(load_rows(OUT / f"{out}_lr.runs.jsonl").values())
    test_rows = at_chosen_lr(load_rows(OUT / f"{out}_test.runs.jsonl").values(), lr_rows)
    var_rows = list(load_rows(OUT / f"{out}_variants.runs.jsonl").values())
    md = markdown_report(test_rows, "## Test split (lr chosen on validation)") if test_rows else ""
    if var_rows:
        # references: CLIP and the recipe's AmorLIP at their chosen lr, seed 0 (the lr stage's rows)
        ref = [r for r in at_chosen_lr(lr_rows, lr_rows) if r["method"] in ("clip", "amorlip", *{
               x["method"] for x in var_rows}) and not r["variant"]]
        names = sorted({x["method"] for x in var_rows})
        md += "\n" + markdown_report(var_rows + [r for r in ref if r["batch"] == min(x["batch"] for x in var_rows)],
                                     f"## Variants of {', '.join(names)} (validation split)")
    long_rows = list(load_rows(OUT / f"{out}_long.runs.jsonl").values())
    if long_rows:
        md += "\n" + markdown_report(long_rows, f"## Trained longer ({long_rows[0]['epochs']} epochs, test split)")
    conv_rows = list(load_rows(OUT / f"{out}_convergence.runs.jsonl").values())
    if conv_rows:
        md += "\n" + convergence_table(lr_rows, conv_rows)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{out}.md").write_text(md)
    write_json(out, {"test": [{k: v for k, v in r.items() if k != "epochs_log"} for r in test_rows],
                     "cells": {"|".join(map(str, k)): v for k, v in cells(test_rows).items()}}, "studies")
    if test_rows:
        plot(test_rows, ROOT / "docs" / "assets" / f"{out}_batch.png")
    print(md)


if __name__ == "__main__":
    main()

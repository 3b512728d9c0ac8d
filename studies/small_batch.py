"""Small-batch regime: unique compositional captions, equal epochs, batch 16 against 256, five methods.

    python -m studies.small_batch --dry-run                 # build the data, one step of every method
    python -m studies.small_batch --quick                   # 2 epochs, 1 seed, B in {16, 64} (make bench)
    python -m studies.small_batch                           # 20 epochs, seeds 0 1 2, B in {16, 256}
    python -m studies.small_batch --variants no_rho in_batch_control   # + AmorLIP variants at B=16 (docs)
    python -m studies.small_batch --seeds 3 4 5 --split val --jobs 2

**Data** (:func:`build_data`, deterministic in its ``data_seed``, 0 for every run). No caption
repeats: the shipped emoji with their CLDR names, and *composites* of 2-4 shipped
tiles placed side by side (emoji, and Fashion-MNIST items with their class phrase), captioned by
joining the tiles' names, e.g. ``"waving hand, a sneaker and cat face, side by side."``. Three
disjoint splits: ``train`` (emoji of the shipped train split minus a validation set of base
emoji, Fashion-MNIST train images), ``val`` (the held-back base emoji, held-back Fashion-MNIST
train images; for choosing settings) and ``test`` (the shipped held-out emoji, Fashion-MNIST test
images; reported, never used to choose anything). A composite's tiles all come from its split's
pool, and no two composites anywhere share the same multiset of captions segments.

**Towers** (the estimator is the point, not the encoders): the image tower is a shared MLP applied
to each 14 x 14 RGB tile of the composite (a stride-14 patch MLP) followed by sum pooling over the
tiles and a linear head; the text tower is a mean of token embeddings (the bundled CLIP BPE
tokenizer, vocabulary restricted to the tokens of the training captions) followed by an MLP. Both
give L2-normalised 64-d features. The studies' one loop (:func:`studies.loop.train_loop`: AdamW,
warmup + cosine, clipped gradients, ``s <= 100``) calls :class:`amortize.losses.ContrastiveLoss`
exactly as the Composer path does (``start_epoch`` every epoch, ``index`` for the moving averages).

**Report**: mean R@1 of image-text retrieval (both directions averaged) on the evaluation split,
per method and batch, mean and sample standard deviation over seeds, and the fraction of CLIP's
small -> large gap each method recovers, ``(R@1(method, B_small) - R@1(CLIP, B_small)) /
(R@1(CLIP, B_large) - R@1(CLIP, B_small))``, with its spread over seeds (seed ``k`` of a method
against seed ``k`` of CLIP). Written to ``results/studies/small_batch.{json,md}`` and
``docs/assets/small_batch_gap.png``; ``--out NAME`` writes elsewhere (the study uses it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import RESULTS_DIR
from studies.loop import train_loop

ROOT = Path(__file__).resolve().parents[1]
OUT = RESULTS_DIR / "studies"
"""Where this study's rows (``<out>.runs.jsonl``) and tables (``<out>.{json,md}``) live (:data:`benchmarks.common.RESULTS_DIR`)."""

METHODS = ("clip", "siglip", "sogclr", "fastclip", "amorlip", "neuclip")
BATCHES = (16, 256)
SEEDS = (0, 1, 2)
EPOCHS = 20
TILE = 14          # tiles are downsampled to TILE x TILE RGB
MAX_TILES = 4
DIM = 64           # joint embedding width

# ------------------------------------------------------------------------------------------ data


@dataclass
class Split:
    """One split of the benchmark data.

    Attributes:
        tiles: long (N, MAX_TILES) ids into the tile pool, -1 where a composite has fewer tiles.
        captions: N captions.
        tokens: long (N, L) token ids in the compact vocabulary (0 = padding, 1 = unknown).
    """

    tiles: Tensor
    captions: list[str]
    tokens: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class BenchData:
    """The tile pool and the three splits.

    Attributes:
        pixels: float (T, 3 * TILE * TILE) normalised tiles (emoji, Fashion-MNIST train, test).
        splits: ``{"train", "val", "test"}`` -> :class:`Split`.
        vocab_size: size of the compact vocabulary.
    """

    pixels: Tensor
    splits: dict[str, Split]
    vocab_size: int


def _join(segments: Sequence[str]) -> str:
    if len(segments) == 1:
        return f"an emoji of {segments[0]}."
    return ", ".join(segments[:-1]) + f" and {segments[-1]}, side by side."


def build_data(data_seed: int = 0, train_composites: int = 3000, eval_composites: int = 632,
               val_fraction: float = 0.1, fashion_prob: float = 0.3, context_length: int = 64) -> BenchData:
    """Build the tile pool and the train / val / test splits (deterministic in ``data_seed``).

    Args:
        data_seed: seeds the validation choice and the composites.
        train_composites: composites added to the training emoji.
        eval_composites: composites added to the emoji of each of ``val`` and ``test``.
        val_fraction: fraction of the shipped train split's base emoji (and of Fashion-MNIST train
            images) held back for validation.
        fashion_prob: probability that a composite's tile is a Fashion-MNIST item (each composite
            has at least one emoji).
        context_length: token positions of the tokenizer.

    Returns:
        A :class:`BenchData`: every split has single emoji pairs first, then composites.
    """
    from amortize.data.shipped import emoji_indices, fashion_mnist_meta, load_arrays, load_meta
    from amortize.data.tokenizer import Tokenizer
    from amortize.data.transforms import uint8_to_float

    rng = np.random.default_rng(data_seed)
    em = load_arrays("emoji.npz")
    names = load_meta("emoji.json")["names"]
    ftr, fte = load_arrays("fashion_mnist_train.npz"), load_arrays("fashion_mnist_test.npz")
    phrases = fashion_mnist_meta()["phrases"]
    n_em, n_ftr = len(names), len(ftr["labels"])
    pixels = torch.cat([
        uint8_to_float(em["images"], TILE),
        uint8_to_float(ftr["images"], TILE),
        uint8_to_float(fte["images"], TILE),
    ]).flatten(1)
    segment = list(names) + [phrases[int(c)] for c in ftr["labels"]] + [phrases[int(c)] for c in fte["labels"]]

    train_em = emoji_indices("train")
    groups = np.unique(em["group"][train_em])
    val_groups = set(rng.choice(groups, size=max(1, int(len(groups) * val_fraction)), replace=False).tolist())
    is_val = np.array([int(em["group"][i]) in val_groups for i in train_em])
    fperm = rng.permutation(n_ftr)
    n_fval = int(n_ftr * val_fraction)
    pools = {
        "train": (train_em[~is_val], n_em + np.sort(fperm[n_fval:])),
        "val": (train_em[is_val], n_em + np.sort(fperm[:n_fval])),
        "test": (emoji_indices("test"), n_em + n_ftr + np.arange(len(fte["labels"]))),
    }
    seen: set[tuple[str, ...]] = {(names[i],) for i in range(n_em)}
    splits: dict[str, Split] = {}
    for name, count in (("test", eval_composites), ("val", eval_composites), ("train", train_composites)):
        emo, fash = pools[name]
        rows = [[int(i)] for i in emo]
        tries = 0
        while len(rows) < len(emo) + count:
            tries += 1
            if tries > 100 * (count + 1):
                raise RuntimeError(f"could not draw {count} unique composites for split {name!r}")
            k = int(rng.integers(2, MAX_TILES + 1))
            use_f = rng.random(k) < fashion_prob
            use_f[int(rng.integers(k))] = False  # at least one emoji
            tiles = [int(rng.choice(fash)) if f else int(rng.choice(emo)) for f in use_f]
            key = tuple(sorted(segment[t] for t in tiles))
            if len(set(tiles)) < k or key in seen:
                continue
            seen.add(key)
            rows.append(tiles)
        tiles_t = torch.full((len(rows), MAX_TILES), -1, dtype=torch.long)
        for r, t in enumerate(rows):
            tiles_t[r, : len(t)] = torch.tensor(t)
        splits[name] = Split(tiles_t, [_join([segment[t] for t in r]) for r in rows])

    tok = Tokenizer(context_length=context_length)
    raw = {k: tok(s.captions) for k, s in splits.items()}
    train_ids = torch.unique(raw["train"])
    train_ids = train_ids[train_ids != 0]
    lut = torch.ones(tok.vocab_size, dtype=torch.long)  # unknown -> 1
    lut[0] = 0
    lut[train_ids] = torch.arange(2, 2 + len(train_ids))
    for k, s in splits.items():
        s.tokens = lut[raw[k]]
    return BenchData(pixels, splits, vocab_size=2 + len(train_ids))


# ------------------------------------------------------------------------------------------ model


class SmallTwoTower(nn.Module):
    """A tile MLP image tower (sum over tiles) and a mean-of-token-embeddings text tower.

    Args:
        pixels: the tile pool (T, P), kept as a buffer-free reference (not a parameter).
        vocab_size: compact vocabulary size.
        dim: joint embedding width.
        hidden: hidden width of both towers.
        init_logit_scale: initial ``log s``.
        init_logit_bias: initial bias, or None for none.
    """

    def __init__(self, pixels: Tensor, vocab_size: int, dim: int = DIM, hidden: int = 128,
                 init_logit_scale: float = math.log(1 / 0.07), init_logit_bias: Optional[float] = None):
        super().__init__()
        self.pixels = pixels
        p = pixels.shape[1]
        self.tile = nn.Sequential(nn.Linear(p, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.image_head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))
        self.embed = nn.EmbeddingBag(vocab_size, hidden, mode="mean", padding_idx=0)
        self.text_head = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden),
                                       nn.Linear(hidden, dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.tensor(float(init_logit_bias)))

    def encode_image(self, tiles: Tensor) -> Tensor:
        """(N, MAX_TILES) tile ids -> (N, dim) normalised features."""
        mask = (tiles >= 0).unsqueeze(-1).float()
        h = self.tile(self.pixels[tiles.clamp(min=0)])  # (N, K, hidden)
        return F.normalize(self.image_head((h * mask).sum(1)), dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """(N, L) compact token ids -> (N, dim) normalised features."""
        return F.normalize(self.text_head(self.embed(tokens)), dim=-1)


# ------------------------------------------------------------------------------------------ methods


def in_batch_log_rel_var(x: Tensor, y: Tensor, scale: float, bias: float = 0.0) -> tuple[Tensor, Tensor]:
    """Delta-method variance of the log of the in-batch negative sums, per row and per column.

    For ``n = B - 1`` negatives ``e_j = exp(S_ij)`` drawn at random, ``Var(log sum_j e_j) ~=
    (mean e^2 / (mean e)^2 - 1) / n``.

    Args:
        x: (B, d) image features; y: (B, d) text features; scale: ``s``; bias: ``b``.

    Returns:
        ``(var_x (B,), var_y (B,))``, >= 0.
    """
    B = x.shape[0]
    S = scale * (x @ y.T) + bias
    off = ~torch.eye(B, dtype=torch.bool, device=S.device)
    neg = S.masked_fill(~off, -math.inf)

    def rel(dim: int) -> Tensor:
        log_m1 = torch.logsumexp(neg, dim) - math.log(B - 1)
        log_m2 = torch.logsumexp(2 * neg, dim) - math.log(B - 1)
        return torch.expm1(log_m2 - 2 * log_m1).clamp(min=0.0) / (B - 1)

    return rel(1), rel(0)


class VarianceBlendEstimator(nn.Module):
    """AmorLIP's EMA amortizer blended with the in-batch sums by inverse variances (a study variant).

    The encoder normaliser of row ``i`` is ``w_i log lambda_i + (1 - w_i) log Z_batch_i`` with
    ``w_i = v_batch_i / (v_batch_i + v_amortizer)``: ``v_batch_i`` is the delta-method variance of
    the in-batch log sum (:func:`in_batch_log_rel_var`; needs the current scale, set by the
    training loop in ``self.scale``) and ``v_amortizer`` a running estimate of the amortizer's own
    error variance, ``EMA[(log Z_batch - log lambda)^2 - v_batch]`` (the two errors are
    independent, so the squared residual's mean is their sum). The wrapped
    :class:`~amortize.estimators.AmortizedEstimator` (``normalizer="ema_target"``) fits and keeps
    its networks as usual; this class only changes what the encoders divide by.

    Args:
        base: the amortized estimator (its ``normalizer`` must be ``ema_target``).
        decay: EMA decay of ``v_amortizer``.
    """

    needs_index = False
    reads_features = True

    def __init__(self, base, decay: float = 0.9):
        super().__init__()
        if base.normalizer != "ema_target":
            raise ValueError("VarianceBlendEstimator needs a base estimator with normalizer='ema_target'")
        self.base = base
        self.decay = float(decay)
        self.scale = 1.0 / 0.07
        self.register_buffer("v_amortizer", torch.tensor(1.0))

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        """Forward the epoch to the wrapped estimator."""
        self.base.start_epoch(epoch, max_epochs)

    def forward(self, x, y, log_z_x, log_z_y, index=None):
        """Normalisers blended by variance; the wrapped estimator's diagnostics, plus ``blend_weight``."""
        from amortize.estimators import PartitionEstimate

        est = self.base(x, y, log_z_x, log_z_y, index)
        with torch.no_grad():
            vx, vy = in_batch_log_rel_var(x.detach().float(), y.detach().float(), self.scale)
            rx, ry = log_z_x - est.log_norm_x, log_z_y - est.log_norm_y
            if self.training:
                resid = 0.5 * ((rx.square() - vx).mean() + (ry.square() - vy).mean())
                self.v_amortizer.mul_(self.decay).add_((1 - self.decay) * resid.clamp(min=1e-4))
            va = self.v_amortizer.clamp(min=1e-4)
            wx, wy = vx / (vx + va), vy / (vy + va)
            lnx = wx * est.log_norm_x + (1 - wx) * log_z_x
            lny = wy * est.log_norm_y + (1 - wy) * log_z_y
        terms = dict(est.terms, blend_weight=0.5 * (wx.mean() + wy.mean()), v_amortizer=va.clone())
        return PartitionEstimate(lnx.to(log_z_x.dtype), lny.to(log_z_y.dtype), terms)



def method_loss(method: str, batch: int, epochs: int, num_samples: int, amorlip: Optional[dict] = None):
    """The :class:`~amortize.losses.ContrastiveLoss` of a method, as the recipes configure it.

    Args:
        method: one of :data:`METHODS`, or ``"amorlip"`` with ``amorlip`` overriding its estimator
            options (``{"estimator": "name"}`` selects another registered estimator).
        batch: batch size (the amortizer's initial bias is ``log batch``).
        epochs: training length (schedules scale with it).
        num_samples: training-set size (moving averages).
        amorlip: overrides of the AmorLIP estimator options, and ``rho``.

    Returns:
        ``(loss_fn, init_logit_scale, init_logit_bias)``.
    """
    from amortize.estimators import ESTIMATORS, MovingAverageEstimator
    from amortize.losses import ContrastiveLoss

    clip_scale = math.log(1 / 0.07)
    lin = {"objective": "linearized", "pos_weight": 1e-3, "chunk_size": None, "checks": "shapes"}
    if method == "clip":
        return ContrastiveLoss("infonce", checks="shapes"), clip_scale, None
    if method == "siglip":
        return ContrastiveLoss("sigmoid", checks="shapes"), math.log(10.0), -10.0
    if method == "sogclr":
        est = MovingAverageEstimator(num_samples, gamma=0.9)
        return ContrastiveLoss(estimator=est, **lin), clip_scale, None
    if method == "fastclip":
        gamma = {"name": "cosine_decay", "start": 1.0, "end": 0.2, "decay_epochs": max(1, epochs // 2)}
        est = MovingAverageEstimator(num_samples, gamma=gamma)
        return ContrastiveLoss(estimator=est, rho=6.5, **lin), clip_scale, None
    if method == "amorlip":
        opts = amorlip_options(batch, epochs, amorlip)
        rho = opts.pop("rho")
        name = opts.pop("estimator")
        if name == "in_batch":  # control: AmorLIP's objective, pos_weight and rho, without the amortizer
            from amortize.estimators import InBatchEstimator

            est = InBatchEstimator()
        elif name == "variance_blend":
            est = VarianceBlendEstimator(ESTIMATORS.build_section(
                {"name": "amortized", **opts, "normalizer": "ema_target"}, key="estimator", dim=DIM))
        else:
            est = ESTIMATORS.build_section({"name": name, **opts}, key="estimator", dim=DIM)
        return ContrastiveLoss(estimator=est, rho=rho, **lin), clip_scale, None
    if method == "neuclip":
        opts = neuclip_options(amorlip)
        rho, pos_weight = opts.pop("rho"), opts.pop("pos_weight")
        est = ESTIMATORS.build_section({"name": "neuclip", **opts}, key="estimator", dim=DIM)
        return ContrastiveLoss(estimator=est, rho=rho, **dict(lin, pos_weight=pos_weight)), clip_scale, None
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def neuclip_options(overrides: Optional[dict] = None) -> dict:
    """NeuCLIP's estimator options in this regime (``recipes/neuclip-small-batch.yaml``), with overrides.

    ``lr`` chosen on the validation split (0.2 against 0.05, B = 16, seed 100; docs/benchmarks.md);
    ``rho`` as FastCLIP's here; ``pos_weight`` 0: the positive left out of the negatives' sum.
    """
    opts: dict[str, Any] = {"num_prototypes": 256, "inner_steps": 10, "restart_every": 500, "lr": 0.2,
                            "rho": 6.5, "pos_weight": 0.0}
    opts.update(overrides or {})
    return opts


def amorlip_options(batch: int, epochs: int, overrides: Optional[dict] = None) -> dict:
    """AmorLIP's estimator options in this regime: the default recipe's, schedules scaled to ``epochs``.

    ``overrides`` replaces keys; ``init_log_z`` and ``width_factor`` go into the amortizer section.
    """
    opts: dict[str, Any] = {
        "estimator": "amortized",
        "amortizer": {"name": "residual_mlp", "width_factor": 0.5, "init_log_z": math.log(batch)},
        "objective": "log_l2",
        "lr": 0.005,
        "inner_steps": 3,
        "update_every": 1,
        "ema_decay": 0.92,
        "ema_every": 2,
        "beta": {"name": "beta_warmup", "final": 0.8, "warmup_epochs": max(1, epochs // 4)},
        "normalizer": "previous_blend",
        "reinit": "every_epoch",
        "rho": {"name": "piecewise", "values": [6.5, 6.5, 6.5, -8.0]},
    }
    for k, v in (overrides or {}).items():
        if k in ("init_log_z", "width_factor", "amortizer_name"):
            key = "name" if k == "amortizer_name" else k
            opts["amortizer"] = {**opts["amortizer"], key: v}
        else:
            opts[k] = v
    return opts


# ------------------------------------------------------------------------------------------ training


@torch.no_grad()
def encode_split(model: SmallTwoTower, split: Split, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Normalised (N, d) image and text features of a split."""
    xs, ys = [], []
    for a in range(0, len(split), chunk):
        xs.append(model.encode_image(split.tiles[a : a + chunk]))
        ys.append(model.encode_text(split.tokens[a : a + chunk]))
    return torch.cat(xs), torch.cat(ys)


def retrieval_r1(model: SmallTwoTower, split: Split) -> dict[str, float]:
    """Image-to-text, text-to-image and mean R@1 on a split (one caption per image)."""
    from amortize.eval.retrieval import retrieval_metrics

    x, y = encode_split(model, split)
    m = retrieval_metrics(x, y, torch.arange(len(split)), ks=(1, 5))
    return {k: float(v) for k, v in m.items()}


@torch.no_grad()
def estimator_error(model: SmallTwoTower, loss_fn, split: Split, batch: int, scale: float,
                    rounds: int = 8, gen: Optional[torch.Generator] = None) -> dict[str, float]:
    """RMSE, in log space, of the encoder normaliser against the expected in-batch partition sum.

    The reference for row ``i`` is ``E[Z_batch(x_i)] = (B - 1) / (N - 1) sum_{j != i} exp(S_ij) +
    c exp(S_ii)`` over the whole training set (what every estimator tries to track, at this batch
    size). The estimator is queried in eval mode (no state changes) on ``rounds`` random batches;
    the in-batch sums of the same batches give the in-batch estimator's error for comparison.
    """
    est = getattr(loss_fn, "estimator", None)
    if est is None or not getattr(loss_fn.objective, "accepts_normalizers", False):
        return {}
    c = loss_fn.objective.partition_weight()
    x, y = encode_split(model, split)
    n = x.shape[0]
    S = scale * (x @ y.T)
    w = torch.full_like(S, math.log((batch - 1) / (n - 1)))
    log_c = math.log(c) if c > 0 else -math.inf
    w.diagonal().fill_(log_c)
    ref_x = torch.logsumexp(S + w, dim=1)
    ref_y = torch.logsumexp(S + w, dim=0)
    from amortize.estimators.base import declared_inputs

    # what the estimator declares it reads, as the loss gives it on one process
    extra = declared_inputs(est, torch.tensor(scale), None, batch - 1, False, c, loss_fn.layout.topology)
    was = est.training
    est.eval()
    err_est, err_batch = [], []
    try:
        for _ in range(rounds):
            idx = torch.randperm(n, generator=gen)[:batch]
            s = S[idx][:, idx]
            wb = torch.zeros_like(s)
            wb.diagonal().fill_(log_c)
            lzx, lzy = torch.logsumexp(s + wb, 1), torch.logsumexp(s + wb, 0)
            out = est(x[idx], y[idx], lzx, lzy, idx, **extra)
            err_est.append(0.5 * ((out.log_norm_x - ref_x[idx]).square().mean()
                                  + (out.log_norm_y - ref_y[idx]).square().mean()))
            err_batch.append(0.5 * ((lzx - ref_x[idx]).square().mean() + (lzy - ref_y[idx]).square().mean()))
    finally:
        est.train(was)
    return {"estimator_rmse": float(torch.stack(err_est).mean().sqrt()),
            "in_batch_rmse": float(torch.stack(err_batch).mean().sqrt())}


@dataclass
class RunConfig:
    """One training run of the benchmark."""

    method: str
    batch: int
    seed: int
    epochs: int = EPOCHS
    split: str = "test"
    lr: Optional[float] = None
    amorlip: Optional[dict] = None
    data_seed: int = 0
    max_steps: Optional[int] = None  # stop early (tests)
    tag: str = ""

    def name(self) -> str:
        """A readable run name."""
        return f"{self.tag or self.method}-b{self.batch}-s{self.seed}"


def encoder_lr(batch: int) -> float:
    """The encoder's peak learning rate at ``batch``: ``2e-3 * sqrt(batch / 16)``, the same for every method.

    Chosen for CLIP on the validation split (seed 0, 20 epochs; ``results/studies/small_batch_lr.runs.jsonl``):
    at B=16 the best of 5e-4, 1e-3, 2e-3, 4e-3 was 2e-3; at B=256 the best of 2e-3 ... 3.2e-2 was 8e-3.
    """
    return 2e-3 * math.sqrt(batch / 16)


_DATA_CACHE: dict[int, BenchData] = {}


def get_data(data_seed: int = 0) -> BenchData:
    """:func:`build_data` cached per process."""
    if data_seed not in _DATA_CACHE:
        _DATA_CACHE[data_seed] = build_data(data_seed)
    return _DATA_CACHE[data_seed]


def train_run(cfg: RunConfig, data: Optional[BenchData] = None) -> dict:
    """Train one model (:func:`studies.loop.train_loop`) and evaluate it on ``cfg.split``; returns a row of results."""
    torch.manual_seed(cfg.seed)
    data = data or get_data(cfg.data_seed)
    train = data.splits["train"]
    n = len(train)
    loss_fn, ls0, lb0 = method_loss(cfg.method, cfg.batch, cfg.epochs, n, cfg.amorlip)
    model = SmallTwoTower(data.pixels, data.vocab_size, init_logit_scale=ls0, init_logit_bias=lb0)
    base_lr = cfg.lr or encoder_lr(cfg.batch)
    diag: dict[str, list[float]] = {}

    def set_scale() -> None:  # the variance blend reads the current temperature
        loss_fn.estimator.scale = float(model.logit_scale.exp())

    def check(step: int, out: dict) -> None:
        if not torch.isfinite(out["loss"]):
            raise FloatingPointError(f"{cfg.name()}: non-finite loss at step {step - 1}")

    def last_diagnostics(epoch: int, steps: int, out: dict) -> None:
        if epoch == cfg.epochs - 1 or (cfg.max_steps is not None and steps >= cfg.max_steps):
            for k in ("amortizer_rmse", "estimator_log_error", "blend_weight", "v_amortizer"):
                if k in out:
                    diag.setdefault(k, []).append(float(out[k]))

    done = train_loop(model, loss_fn, train, batch=cfg.batch, epochs=cfg.epochs, lr=base_lr, seed=cfg.seed,
                      max_steps=cfg.max_steps, on_step=check, on_epoch_end=last_diagnostics,
                      before_loss=set_scale if isinstance(loss_fn.estimator, VarianceBlendEstimator) else None)
    model.eval()
    row = {"method": cfg.method, "tag": cfg.tag or cfg.method, "batch": cfg.batch, "seed": cfg.seed,
           "epochs": cfg.epochs, "split": cfg.split, "lr": base_lr, "steps": done.steps, "wall_s": done.wall_s,
           "loss_s": done.loss_s, "scale": float(model.logit_scale.exp()), "amorlip": cfg.amorlip}
    row.update(retrieval_r1(model, data.splits[cfg.split]))
    row.update(estimator_error(model, loss_fn, train, cfg.batch, float(model.logit_scale.exp()),
                               gen=torch.Generator().manual_seed(1234)))
    row.update({k: v[-1] for k, v in diag.items()})
    return row


def _worker(cfg: RunConfig) -> dict:
    torch.set_num_threads(1)
    return train_run(cfg)


def run_all(cfgs: Sequence[RunConfig], jobs: int = 1, log=print, jsonl: Optional[Path] = None,
            resume: bool = True) -> list[dict]:
    """Run configurations (``jobs`` processes, one thread each); rows in the order given.

    ``jsonl``: append each finished row to this file; with ``resume``, skip the configurations
    already in it (so an interrupted study resumes), else start the file afresh.
    """
    done: dict[str, dict] = {}
    if jsonl is not None:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
    if jsonl is not None and jsonl.exists() and not resume:
        jsonl.unlink()
    if jsonl is not None and jsonl.exists():
        for line in jsonl.read_text().splitlines():
            r = json.loads(line)
            done[r["key"]] = r
    todo = [c for c in cfgs if _key(c) not in done]
    rows = dict(done)

    def finish(c: RunConfig, r: dict) -> None:
        r["key"] = _key(c)
        rows[r["key"]] = r
        log(f"{c.name():40s} split={c.split} R@1={r['mean_R@1']:.4f} wall={r['wall_s']:.0f}s "
            + " ".join(f"{k}={r[k]:.3f}" for k in ("estimator_rmse", "in_batch_rmse") if k in r))
        if jsonl is not None:
            with jsonl.open("a") as f:
                f.write(json.dumps(r) + "\n")

    if jobs <= 1:
        torch.set_num_threads(1)
        for c in todo:
            finish(c, train_run(c))
    else:
        with ProcessPoolExecutor(jobs) as ex:
            futs = [(c, ex.submit(_worker, c)) for c in todo]
            for c, f in futs:
                finish(c, f.result())
    return [rows[_key(c)] for c in cfgs]


def _key(c: RunConfig) -> str:
    return json.dumps([c.tag or c.method, c.method, c.batch, c.seed, c.epochs, c.split, c.lr, c.amorlip,
                       c.data_seed], sort_keys=True, default=str)


# ------------------------------------------------------------------------------------------ report


def _mean_sd(vals: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(rows: list[dict], metric: str = "mean_R@1") -> dict:
    """Per (tag, batch): mean, sd of ``metric``; per tag at the small batch: gap recovered (mean, sd)."""
    by: dict[tuple[str, int], dict[int, float]] = {}
    extra: dict[tuple[str, int], dict[str, list[float]]] = {}
    for r in rows:
        by.setdefault((r["tag"], r["batch"]), {})[r["seed"]] = r[metric]
        e = extra.setdefault((r["tag"], r["batch"]), {})
        for k in ("wall_s", "estimator_rmse", "in_batch_rmse"):
            if k in r:
                e.setdefault(k, []).append(r[k])
    batches = sorted({b for _, b in by})
    small, large = batches[0], batches[-1]
    cells = []
    def order(kv):
        (tag, b), base = kv[0], kv[0][0].split("[")[0]
        return (b, METHODS.index(base) if base in METHODS else len(METHODS), tag)

    for (tag, b), vals in sorted(by.items(), key=order):
        m, sd = _mean_sd(list(vals.values()))
        cell = {"tag": tag, "batch": b, "mean": m, "sd": sd, "seeds": sorted(vals),
                **{k: statistics.mean(v) for k, v in extra[(tag, b)].items()}}
        clip_s, clip_l = by.get(("clip", small)), by.get(("clip", large))
        if b == small and clip_s and clip_l and len(batches) > 1:
            fr = []
            for s, v in vals.items():
                if s in clip_s and s in clip_l and clip_l[s] != clip_s[s]:
                    fr.append((v - clip_s[s]) / (clip_l[s] - clip_s[s]))
            if fr:
                cell["gap_recovered"], cell["gap_recovered_sd"] = _mean_sd(fr)
            diffs = [v - clip_s[s] for s, v in vals.items() if s in clip_s]
            if diffs:
                cell["minus_clip"], cell["minus_clip_sd"] = _mean_sd(diffs)
        cells.append(cell)
    return {"metric": metric, "small": small, "large": large, "cells": cells}


def markdown(summary: dict, title: str = "") -> str:
    """The summary as a markdown table."""
    from benchmarks.common import markdown_table

    head = ["method", "batch", f"{summary['metric']} mean", "sd (seeds)", "n", "vs CLIP same batch",
            "gap recovered", "gap sd", "normaliser RMSE", "in-batch RMSE", "wall s"]
    body = []
    for c in summary["cells"]:
        def f(k, fmt="{:.3f}"):
            return fmt.format(c[k]) if k in c else "-"
        diff = (f"{c['minus_clip']:+.3f} ± {c['minus_clip_sd']:.3f}" if "minus_clip" in c and c["tag"] != "clip"
                else "-")
        body.append([c["tag"], c["batch"], f("mean"), f("sd"), len(c["seeds"]), diff,
                     f("gap_recovered", "{:.2f}"), f("gap_recovered_sd", "{:.2f}"),
                     f("estimator_rmse"), f("in_batch_rmse"), f("wall_s", "{:.0f}")])
    return (f"{title}\n\n" if title else "") + markdown_table(head, body)


def plot(summary: dict, path: Path) -> None:
    """Bar chart of the gap each method recovers at the small batch (error bars: sd over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in summary["cells"] if c["batch"] == summary["small"] and "gap_recovered" in c]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar([c["tag"] for c in cells], [c["gap_recovered"] for c in cells],
           yerr=[c["gap_recovered_sd"] for c in cells], capsize=4, color="#4a7bb7")
    ax.tick_params(axis="x", labelrotation=25)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_ylabel(f"fraction of CLIP's B={summary['small']}->{summary['large']} gap")
    ax.set_title(f"{summary['metric']} at B={summary['small']} (mean ± sd over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dry_run(methods: Sequence[str], batches: Sequence[int], steps: int = 1) -> list[dict]:
    """Build the data and take ``steps`` training steps of every method at every batch (no report)."""
    data = get_data(0)
    rows = []
    for m in methods:
        for b in batches:
            rows.append(train_run(RunConfig(m, b, 0, epochs=1, split="val", max_steps=steps), data))
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    p.add_argument("--batches", type=int, nargs="*", default=list(BATCHES))
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--amorlip", default=None,
                   help="JSON overrides of the AmorLIP (or NeuCLIP, for --methods neuclip) estimator options")
    p.add_argument("--tag", default="", help="suffix of the amorlip/neuclip rows' tag (settings sweeps)")
    p.add_argument("--variants", nargs="*", default=[],
                   help="AmorLIP variants of studies.amorlip_variants to add at the smallest batch, as amorlip[NAME]")
    p.add_argument("--out", default="small_batch", help="name of the results/studies/<out>.{json,md} results")
    p.add_argument("--plot", default=None,
                   help="plot path (default docs/assets/small_batch_gap.png; none with --quick unless given)")
    p.add_argument("--quick", action="store_true", help="2 epochs, seed 0, B in {16, 64}")
    p.add_argument("--fresh", action="store_true",
                   help="rerun every configuration (default: reuse the finished runs in results/studies/<out>.runs.jsonl)")
    p.add_argument("--dry-run", action="store_true", help="build the data and take one step of every method")
    a = p.parse_args(argv)
    if a.dry_run:
        rows = dry_run(a.methods, a.batches)
        d = get_data(0)
        print({k: len(s) for k, s in d.splits.items()}, f"vocab {d.vocab_size}")
        print(f"{len(rows)} method x batch steps ran")
        return
    if a.quick:
        a.epochs, a.seeds, a.batches = 2, [0], [16, 64]
        a.out = a.out if a.out != "small_batch" else "small_batch_quick"
    if a.plot is None:
        a.plot = "" if a.quick else "docs/assets/small_batch_gap.png"
    amor = json.loads(a.amorlip) if a.amorlip else None
    cfgs = [RunConfig(m, b, s, epochs=a.epochs, split=a.split, amorlip=amor if m in ("amorlip", "neuclip") else None,
                      tag=f"{m}{a.tag}" if a.tag and m in ("amorlip", "neuclip") else "")
            for m in a.methods for b in a.batches for s in a.seeds]
    if a.variants:
        from studies.amorlip_variants import VARIANTS

        unknown = sorted(set(a.variants) - set(VARIANTS))
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
        cfgs += [RunConfig("amorlip", min(a.batches), s, epochs=a.epochs, split=a.split,
                           amorlip=VARIANTS[v] or None, tag=f"amorlip[{v}]") for v in a.variants for s in a.seeds]
    jsonl = OUT / f"{a.out}.runs.jsonl"
    rows = run_all(cfgs, jobs=a.jobs, jsonl=jsonl, resume=not a.fresh)
    summary = summarise(rows)
    cmd = "python -m studies.small_batch " + " ".join(argv if argv is not None else sys.argv[1:])
    from benchmarks.common import write_json

    write_json(a.out, {"command": cmd, "epochs": a.epochs, "split": a.split, "summary": summary, "rows": rows}, "studies")
    md = markdown(summary, f"`{cmd}` ({a.epochs} epochs, split `{a.split}`)")
    (OUT / f"{a.out}.md").write_text(md)
    if a.plot and len(a.batches) > 1:
        plot(summary, ROOT / a.plot)
    print(md)


if __name__ == "__main__":
    main()

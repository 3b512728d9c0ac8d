"""A normaliser-network estimator composed of parts: network, fit, normaliser, schedule.

Per training step (AmorLIP spec section 7, NeuCLIP spec section 3), in this order:

1. restart (``restart`` part, NeuCLIP): every ``T_r`` steps the network restarts from the other
   modality's batch embeddings and the inner optimiser is reset;
2. Stage I targets: the in-batch log sums, blended with the previous-epoch network when the
   ``normalizer`` part blends (Eq. 12);
3. fit (``fit`` part) when the ``cadence`` part says so: ``inner_steps`` optimiser steps;
4. the encoder normaliser (``normalizer`` part): ``Z_comb``, the EMA network or the online network;
5. the EMA update of the target network when the ``cadence`` part says so (normalisers with an EMA copy).

At an epoch start the EMA network becomes ``previous`` and, when the ``reinit`` part says so, the
online network, its optimiser and its EMA are re-initialised.

The processes are those of the layout the loss runs: the loss passes its layout's
:class:`~amortize.comm.Topology` as the declared input ``topology`` at every step, and the
estimator remembers the topology it was last called with. Its exchanger averages the fit's
gradients and gathers the restart rows when the rows are local (``local_rows``), and its world
size scales the inner learning rate (the fit's ``lr_scaling``) at an epoch start, on a load, and
at the first step with a topology other than the remembered one (before the estimator is first
called: :data:`~amortize.comm.DEFAULT_TOPOLOGY`, the default group read lazily, as the layout a
loss builds by default).
"""

from __future__ import annotations

import copy
import math
from typing import Annotated, Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from amortize import checks as K
from amortize import kernels
from amortize.amortizers import AMORTIZERS
from amortize.comm import DEFAULT_TOPOLOGY, Topology, all_gather_no_grad
from amortize.estimators.base import PartitionEstimate, PartitionEstimator
from amortize.estimators.normalizer.fit import MODALITIES, Fit, choice
from amortize.estimators.normalizer.parts import (
    CADENCES,
    EPOCH0_PREVIOUS,
    NORMALIZERS,
    REINIT_POLICIES,
    RESTARTS,
    Cadence,
    Epoch0Previous,
    Reinit,
    due,
    reinit_now,
    reset_state_rows,
    restart_draw,
)
from amortize.registry import Bound, Part, Section
from amortize.schedules import SCHEDULES, BetaWarmup, Schedule, build_schedule

__all__ = ["NormalizerNetworkEstimator", "blend_log_targets", "NETWORK", "FIT", "NORMALIZER", "RESTART", "BETA"]

# the options that are sections of their own, bound with the estimator's section under their dotted keys
NETWORK = Part(AMORTIZERS, passed=("dim",), rebuilt=True)
"""``network``: a section of :data:`amortize.amortizers.AMORTIZERS`, built at every re-initialisation."""
FIT = Part(ctor=Fit)
"""``fit``: the options of :class:`~amortize.estimators.normalizer.fit.Fit` (its ``optimizer`` a section)."""
NORMALIZER = Part(NORMALIZERS)
"""``normalizer``: a section of :data:`~amortize.estimators.normalizer.parts.NORMALIZERS`."""
RESTART = Part(RESTARTS)
"""``restart``: a section of :data:`~amortize.estimators.normalizer.parts.RESTARTS`."""
BETA = Part(SCHEDULES)
"""``beta``: a section of :data:`amortize.schedules.SCHEDULES` (a number: constant)."""


def blend_log_targets(log_prev: Tensor, log_batch: Tensor, beta: float) -> Tensor:
    """``log(beta * exp(log_prev) + (1 - beta) * exp(log_batch))``: Eq. 12 in log space.

    Args:
        log_prev: (B,) log partition predicted by the previous-epoch network.
        log_batch: (B,) in-batch log partition sums.
        beta: blending weight in [0, 1].

    Returns:
        (B,) blended log targets.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return log_batch
    if beta == 1.0:
        return log_prev
    return torch.logaddexp(log_prev + math.log(beta), log_batch + math.log1p(-beta))


def _name(value: Any, built: Any) -> str:
    """The registered name a part was given by (a bound section, a name, a mapping), else its own."""
    if isinstance(value, Bound):
        return value.name
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("name"), str):
        return value["name"]
    return getattr(built, "name", type(built).__name__)


class NormalizerNetworkEstimator(PartitionEstimator):
    """One network per modality predicts each row's ``log Z``; how it is fitted, what the encoders
    divide by and when it is refreshed are parts (see the module docstring).

    Submodules: ``online`` (fitted by the inner optimiser), and, for normalisers with an EMA copy,
    ``target`` (EMA of ``online``) and ``previous`` (the EMA network frozen at the epoch start),
    each a ``ModuleDict(image=..., text=...)``. Declared state (:meth:`state_rules`): those
    networks, the counters ``step`` (training steps of the run), ``epoch_step`` (of the current
    epoch), ``epoch``, ``max_epochs``, ``has_previous``, and the inner optimiser's state (extra
    state). All are identical on every process (each computes the same update from the same
    gathered rows) and restored on resume. No network parameter requires grad outside the fit, so
    the outer optimiser, DDP and the encoders' clipping never see them. The topology it was last
    called with (:attr:`topology`) is not state: it is the calling loss's, and never saved.

    Args:
        dim: embedding width ``d``.
        network: the network's section in :data:`amortize.amortizers.AMORTIZERS`
            (``residual_mlp``, ``random_fourier``, ``prototypes``, ...).
        fit: the fit's options (:class:`~amortize.estimators.normalizer.fit.Fit`): ``objective``,
            ``log_l2_weight``, ``optimizer`` (a section), ``inner_steps``, ``clip_norm``, ``lr_scaling``.
        normalizer: a section in :data:`~amortize.estimators.normalizer.parts.NORMALIZERS`.
        cadence: :data:`~amortize.estimators.normalizer.parts.Cadence`: ``per_epoch`` or ``global``.
        reinit: :data:`~amortize.estimators.normalizer.parts.Reinit`: ``every_epoch`` or ``never``.
        epoch0_previous: :data:`~amortize.estimators.normalizer.parts.Epoch0Previous`: ``none`` or ``initial``.
        restart: a section in :data:`~amortize.estimators.normalizer.parts.RESTARTS`, e.g.
            ``{"name": "batch_embeddings", "every": 500}``.
        update_every: ``T_online``, steps between fits.
        ema_decay: the EMA decay ``alpha`` (normalisers with an EMA copy); its one default.
        ema_every: ``T_target``, steps between EMA updates.
        beta: schedule (over epochs) of the previous-epoch blending weight (the EMA decay's schedule
            under ``ema_ramp``); a float is constant.
        seed: seeds the (re-)initialisation of the networks and the restart draws.

    A section-valued option (``network``, ``fit`` and its ``optimizer``, ``normalizer``,
    ``restart``, ``beta``) arrives bound from a recipe (the loader checked it under its dotted
    key); given as a section in Python, it is bound here under its option's name. The presets
    (``amortized``, ``amorlip_code``, ``amorlip_paper``, ``neuclip``) are this constructor with
    other defaults and flat aliases (:mod:`amortize.estimators.normalizer.presets`).
    """

    def __init__(
        self,
        dim: int,
        network: Annotated[Section, NETWORK] = "residual_mlp",
        fit: Annotated[Optional[dict], FIT] = None,
        normalizer: Annotated[Section, NORMALIZER] = "previous_blend",
        cadence: Cadence = "per_epoch",
        reinit: Reinit = "every_epoch",
        epoch0_previous: Epoch0Previous = "none",
        restart: Annotated[Section, RESTART] = "none",
        update_every: int = 1,
        ema_decay: float = 0.92,
        ema_every: int = 2,
        beta: Annotated[Union[float, dict, Schedule], BETA] = BetaWarmup(0.8, 16),
        seed: int = 0,
    ):
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self._normalizer = NORMALIZER.take(normalizer, "normalizer")
        self.normalizer = _name(normalizer, self._normalizer)
        self.cadence = choice("cadence", cadence, CADENCES)
        self.reinit = choice("reinit", reinit, REINIT_POLICIES)
        self.epoch0_previous = choice("epoch0_previous", epoch0_previous, EPOCH0_PREVIOUS)
        self._restart = RESTART.take(restart, "restart")
        self.restart = _name(restart, self._restart)
        for name, v in (("update_every", update_every), ("ema_every", ema_every)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.fit: Fit = FIT.take(fit, "fit")
        self.dim = int(dim)
        # bound once (a recipe's at load), built at every re-initialisation
        self._network: Bound = NETWORK.take(network, "network")
        self.network = ({"name": self._network.name, **self._network.options} if self._network.options
                        else self._network.name)
        ctor = self._network.ctor
        #: whether the network reads more than the embedding (the positive score, the scale, ...)
        self._reads = bool(getattr(ctor, "reads", ()))
        #: the extra inputs the loss module passes (see :func:`~amortize.estimators.base.declared_inputs`)
        self.extra_inputs = ("scale", "bias", "num_negatives", "local_rows", "topology") if self._reads else ("topology",)
        if self._restart.every is not None and not hasattr(ctor, "restart"):
            raise ValueError(f"restart {self.restart!r} needs a network with a restart(rows) method; "
                             f"{self._network.name!r} has none")
        self.update_every = int(update_every)
        self.ema_decay = float(ema_decay)
        self.ema_every = int(ema_every)
        self.beta_schedule = build_schedule(BETA.take(beta, "beta"))
        self.seed = int(seed)

        self.online = self._fresh_nets(epoch=0)
        for copy_name in self._normalizer.copies:
            setattr(self, copy_name, copy.deepcopy(self.online))
        for _, net in self._networks():
            net.requires_grad_(False)
        self.add_state("step", torch.zeros((), dtype=torch.long))
        self.add_state("epoch_step", torch.zeros((), dtype=torch.long))
        self.add_state("epoch", torch.full((), -1, dtype=torch.long))
        self.add_state("max_epochs", torch.ones((), dtype=torch.long))
        self.add_state("has_previous", torch.zeros((), dtype=torch.bool))
        self.declare_state("online")
        for copy_name in self._normalizer.copies:
            self.declare_state(copy_name)
        self.declare_state("_extra_state")  # the inner optimiser
        self._topology: Topology = DEFAULT_TOPOLOGY  # until a loss calls it with its layout's
        self._optimizer = self._new_optimizer()
        self._params = list(self.online.parameters())
        self._host: Optional[list[int]] = None
        self.register_load_state_dict_post_hook(self._invalidate_counters)

    # ---------------------------------------------------------------- construction helpers

    def _networks(self):
        yield "online", self.online
        for copy_name in self._normalizer.copies:
            yield copy_name, getattr(self, copy_name)

    def _fresh_nets(self, epoch: int) -> nn.ModuleDict:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + epoch)
            return nn.ModuleDict({m: self._network.build(dim=self.dim) for m in MODALITIES})

    @property
    def topology(self) -> Topology:
        """The processes of the layout that last called the estimator (before any call: the default group, lazily)."""
        return self._topology

    @property
    def inner_lr(self) -> float:
        """The inner optimiser's learning rate now: the fit's ``lr`` times its ``lr_scaling`` factor
        for the world size of :attr:`topology`."""
        return self.fit.inner_lr(self._topology.world_size)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return self.fit.new_optimizer(self.online.parameters(), self._topology.world_size)

    def _use_topology(self, topology: Optional[Topology]) -> Topology:
        """Remember the step's ``topology`` (None: keep the remembered one); a new one sets the inner lr."""
        if topology is None or topology is self._topology:
            return self._topology
        if not isinstance(topology, Topology):
            raise TypeError(f"{type(self).__name__}: the topology input must be an amortize.comm.Topology "
                            f"(the loss passes its layout's), got {type(topology).__name__}")
        self._topology = topology
        self.fit.set_lr(self._optimizer, topology.world_size)
        return topology

    def get_extra_state(self) -> dict:
        """The inner optimiser's state, saved with the module's ``state_dict``."""
        return {"optimizer": self._optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        """Restore the inner optimiser's state, at the inner lr of :attr:`topology`'s world size.

        The saved lr may come from another number of processes; an estimator loaded before a loss
        on other processes first calls it gets that loss's lr at the call.
        """
        self._optimizer = self._new_optimizer()
        self._optimizer.load_state_dict(state["optimizer"])
        self.fit.set_lr(self._optimizer, self._topology.world_size)

    # ---------------------------------------------------------------- schedule

    @property
    def beta(self) -> float:
        """The previous-epoch blending weight of the current epoch."""
        return self.beta_schedule(max(0, int(self.epoch)), int(self.max_epochs))

    def ema_decay_at(self, epoch: int, max_epochs: int) -> float:
        """The EMA decay used in ``epoch`` (the ``normalizer`` part decides: constant or ramped)."""
        return self._normalizer.ema_decay(self.ema_decay, self.beta_schedule(max(0, epoch), max_epochs))

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        """Epoch start: the EMA network becomes ``previous``; re-initialise per the ``reinit`` part.

        The within-epoch step counter restarts, and the inner learning rate is set from the world
        size of :attr:`topology` (the fit's ``lr_scaling``). Idempotent: calling it again for the
        current epoch (as a resumed run does) changes nothing.

        Raises:
            ValueError: for a negative or fractional ``epoch``, or ``max_epochs < 1``.
        """
        K.epoch_counts(epoch, max_epochs)
        if epoch == int(self.epoch):
            return
        self.max_epochs.fill_(max(1, max_epochs))
        first = int(self.epoch) < 0
        with torch.no_grad():
            if "previous" in self._normalizer.copies and (not first or self.epoch0_previous == "initial"):
                # before the first epoch the EMA network is still the untrained initial one
                self.previous.load_state_dict(self.target.state_dict())
                self.has_previous.fill_(True)
            if reinit_now(self.reinit, first):
                fresh = self._fresh_nets(epoch).to(self.step.device)
                for _, net in self._networks():
                    if net is not getattr(self, "previous", None):
                        net.load_state_dict(fresh.state_dict())
                self._optimizer = self._new_optimizer()
        self.fit.set_lr(self._optimizer, self._topology.world_size)
        self.epoch_step.zero_()
        self.epoch.fill_(epoch)
        self._host = None

    # ---------------------------------------------------------------- per step

    def _counters(self) -> list[int]:
        """``[epoch, max_epochs, step, epoch_step, has_previous]`` as Python ints.

        The buffers are the state (checkpoints, resume); a host copy is read from them once, after
        construction, a load or an epoch start, and then advanced beside them, so a training step
        does not synchronise with the device to read its own counters.
        """
        if self._host is None:
            self._host = torch.stack(
                [self.epoch, self.max_epochs, self.step, self.epoch_step, self.has_previous.long()]
            ).tolist()
        return list(self._host)

    def _invalidate_counters(self, *args, **kwargs) -> None:
        self._host = None

    def _predict(self, nets: nn.ModuleDict, u: dict[str, Tensor], ctx: Optional[dict] = None) -> dict[str, Tensor]:
        if not ctx:
            return {m: nets[m](u[m]) for m in MODALITIES}
        return {m: nets[m](u[m], **ctx[m]) for m in MODALITIES}

    def _fit(self, u: dict[str, Tensor], targets: dict[str, Tensor], batch: dict[str, Tensor],
             ctx: Optional[dict] = None, average_over: Optional[Topology] = None) -> tuple[Tensor, Tensor]:
        """The fit part's inner steps (gradients averaged over ``average_over``, if given); returns
        the last fit loss and the online networks' RMSE against the in-batch targets before the fit
        (read off the first forward)."""
        return self.fit.run(self.online, self._params, self._optimizer,
                            lambda nets: self._predict(nets, u, ctx), targets, batch, average_over=average_over)

    @torch.no_grad()
    def _ema_update(self, decay: float) -> None:
        for pt, po in zip(self.target.parameters(), self.online.parameters()):
            pt.lerp_(po, 1.0 - decay)

    def _context(self, u: dict[str, Tensor], inputs: dict[str, Any]) -> Optional[dict]:
        """Per-modality keyword inputs of a network that reads more than the embedding (``prototypes``)."""
        if not self._reads:
            return None
        if "scale" not in inputs:
            raise ValueError(f"network {self.network!r} reads the scale: call the estimator with scale=... "
                             "(ContrastiveLoss passes it)")
        scale = torch.as_tensor(inputs["scale"], dtype=torch.float32, device=u["image"].device).detach()
        bias = inputs.get("bias")
        bias = torch.zeros((), device=scale.device) if bias is None else torch.as_tensor(bias).detach().float()
        n = u["image"].shape[0]
        negatives = float(inputs.get("num_negatives", n - 1))
        pos = kernels.positive_scores(u["image"], u["text"], scale, bias)  # S_ii, the positive's score
        return {m: {"pos": pos, "scale": scale, "bias": bias, "num_negatives": negatives} for m in MODALITIES}

    @torch.no_grad()
    def _restart_from(self, u: dict[str, Tensor], step: int, gather_over: Optional[Topology]) -> None:
        """Restart each modality's network from the OTHER modality's embeddings (the same draw everywhere).

        Args:
            u: ``{modality: (B, d)}`` this step's embeddings.
            step: the training step, which seeds the draw.
            gather_over: the processes whose rows the draw is from (local rows: each process holds
                its own ``B``; the draw is from the ``W * B`` gathered through its exchanger); None:
                ``u`` is every row already.
        """
        rows = {m: u[m] if gather_over is None else all_gather_no_grad(u[m], gather_over) for m in MODALITIES}
        other = {"image": "text", "text": "image"}
        restarted = {}
        for m in MODALITIES:
            net = self.online[m]
            at, idx = restart_draw(rows[other[m]].shape[0], net.restart_size, self.seed, step,
                                   self._restart.short_batch)
            net.restart(rows[other[m]][idx.to(rows[m].device)], at.to(rows[m].device))
            restarted[m] = at
        self._reset_after_restart(restarted)

    def _reset_after_restart(self, restarted: dict[str, Tensor]) -> None:
        """The restart part's ``reset_optimizer`` rule, given the prototypes ``{modality: (k,)}`` that restarted.

        ``restarted``: a fresh optimiser when every prototype restarted, else the restarted rows'
        state only (:func:`~amortize.estimators.normalizer.parts.reset_state_rows`); the others keep
        their AdaGrad sums, so their next steps stay as small as their history makes them.
        """
        rule = self._restart.reset_optimizer
        if rule == "none":
            return
        every_row = all(torch.unique(at).numel() == self.online[m].restart_size for m, at in restarted.items())
        if rule == "all" or every_row:
            self._optimizer = self._new_optimizer()
            return
        for m, at in restarted.items():
            net = self.online[m]
            for p in net.parameters():
                # a parameter not indexed by the prototypes has its whole state reset
                indexed = p.dim() >= 1 and p.shape[0] == net.restart_size
                reset_state_rows(self._optimizer, p, at if indexed else None)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        log_z_x: Tensor,
        log_z_y: Tensor,
        index: Optional[Tensor] = None,
        **inputs: Any,
    ) -> PartitionEstimate:
        """Fit (in training mode) and return the normalisers; see the module docstring for the order.

        Args:
            x: (B, d) detached image features.
            y: (B, d) detached text features.
            log_z_x: (B,) in-batch log partition sums of the image rows.
            log_z_y: (B,) in-batch log partition sums of the text columns.
            index: unused (no per-sample state).
            **inputs: the extra inputs named by :attr:`extra_inputs`: ``topology``, the processes
                of the layout (remembered: see the module docstring; omitted: the remembered one),
                and, for networks that read them, ``scale``, ``bias``, ``num_negatives`` (how many
                negatives each in-batch sum weighs) and ``local_rows`` (whether the rows are this
                process's only: the fit's gradients are then averaged and the restart rows
                gathered over the topology).

        Terms: ``amortizer_fit`` (the last inner step's Stage I loss) and ``amortizer_rmse`` (the
        online networks' RMSE against the in-batch log sums, before this step's fit) on the steps
        that fit; ``target_rmse`` or ``online_rmse`` (the RMSE of what the encoders divide by) for
        the normalisers that read a network.
        """
        K.feature_dim(("x", "y"), (x, y), self.dim, type(self).__name__)
        topology = self._use_topology(inputs.get("topology"))  # before an epoch start here builds an optimiser
        epoch, max_epochs, step, epoch_step, has_previous = self._counters()
        if epoch < 0:
            self.start_epoch(0, max_epochs)
            epoch, max_epochs, step, epoch_step, has_previous = self._counters()
        fit_now, ema_now = due(self.cadence, step, epoch_step, self.update_every, self.ema_every)
        u = {"image": x.detach().float(), "text": y.detach().float()}
        batch = {"image": log_z_x.detach().float(), "text": log_z_y.detach().float()}
        ctx = self._context(u, inputs)
        # local rows: this process's alone, so the fit and the restart span the topology's processes
        spread = topology if bool(inputs.get("local_rows", False)) else None
        if self.training and self._restart.due(step):
            self._restart_from(u, step, spread)
        with torch.no_grad():
            if has_previous and self._normalizer.blends_targets:
                beta = self.beta_schedule(epoch, max_epochs)
                prev = self._predict(self.previous, u, ctx)
                comb = {m: blend_log_targets(prev[m], batch[m], beta) for m in MODALITIES}
            else:
                comb = batch
        terms: dict[str, Tensor] = {}
        if self.training and fit_now:
            terms["amortizer_fit"], terms["amortizer_rmse"] = self._fit(u, comb, batch, ctx, spread)
        norm = self._normalizer.encoder(comb, batch, lambda copy_name: self._predict(getattr(self, copy_name), u, ctx),
                                        terms)
        if self.training:
            self.step.add_(1)
            self.epoch_step.add_(1)
            self._host[2] += 1
            self._host[3] += 1
            if ema_now and "target" in self._normalizer.copies:
                self._ema_update(self.ema_decay_at(epoch, max_epochs))
        return PartitionEstimate(norm["image"].to(log_z_x.dtype), norm["text"].to(log_z_y.dtype), terms)

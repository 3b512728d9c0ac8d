"""The loss module: objective x estimator x layout, and the one place that orders a training step.

>>> import torch
>>> from amortize.losses import ContrastiveLoss
>>> from amortize.estimators import AmortizedEstimator
>>> loss_fn = ContrastiveLoss("linearized", estimator=AmortizedEstimator(dim=8))
>>> x = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
>>> y = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
>>> out = loss_fn(x, y, scale=torch.tensor(10.0))
>>> sorted(out)[:3]
['amortizer_fit', 'amortizer_rmse', 'image']

Like open_clip's losses, ``forward`` takes ``(image_features, text_features, scale)`` with the
scale already exponentiated (``s``, not ``log s``), and returns a dict whose ``"loss"`` entry is
what to backpropagate; the other entries are detached terms for logging.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from amortize import checks as K
from amortize import kernels
from amortize.comm import Layout, build_layout
from amortize.estimators import ESTIMATORS
from amortize.estimators.base import PartitionEstimator, declared_inputs
from amortize.estimators.in_batch import InBatchEstimator
from amortize.objectives import OBJECTIVES, Objective, Pairs, Partition, partition
from amortize.objectives.base import TEMPERATURE_FORMS, Temperature, mean_log_ratio, rescale_temperature
from amortize.options import Range, keyed
from amortize.registry import Section
from amortize.schedules import Schedule, build_schedule

__all__ = ["ContrastiveLoss", "DEFAULT_OBJECTIVE", "DEFAULT_LAYOUT"]

DEFAULT_OBJECTIVE = "linearized"
"""The objective a loss (and a recipe's ``loss.objective``) has when none is named."""

DEFAULT_LAYOUT = "gather"
"""The process layout a loss (and a recipe's ``loss.layout``) has when none is named."""


class ContrastiveLoss(nn.Module):
    """A contrastive objective joined with its partition-function estimator and process layout.

    One step (:meth:`forward`): validate and lay out the pairs; compute the in-batch partition sums
    without gradient (objectives that read them); let the estimator turn them into normalisers
    (objectives that accept normalisers; it may update its state); compute the objective's terms;
    rescale the temperature.

    Args:
        objective: an :class:`~amortize.objectives.Objective`, a registered name (``infonce``,
            ``sigmoid``, ``linearized``) or a section ``{"name": ..., **options}``.
        estimator: a :class:`~amortize.estimators.PartitionEstimator` for objectives that accept
            normalisers (default: in-batch); must be None for the others.
        layout: how the columns of the global batch reach each process: ``gather``, ``ring``,
            ``local`` (see :mod:`amortize.comm`), built on the default group, whose size it reads
            when it runs (one process while ``torch.distributed`` is not initialised); or a
            :class:`~amortize.comm.Layout` built with its own :class:`~amortize.comm.Topology`
            (``Gather(ONE_PROCESS)``: this process's batch alone, whatever ``torch.distributed``
            says).
        rho: temperature-rescaling schedule over epochs (FastCLIP / AmorLIP), a float, a schedule
            section such as ``{"name": "piecewise", "values": [6.5, 6.5, 6.5, -8.0]}``, or None.
        temperature: how ``rho`` enters (:data:`~amortize.objectives.base.TEMPERATURE_FORMS`):
            ``rescaled``, ``loss / sg(s) + rho / s`` (FastCLIP's rescaling as AmorLIP's code has
            it); ``robust``, ``loss / sg(s) + (rho + sg(F)) / s`` with ``F`` the batch's mean log
            ratio of the normalisers to the positives (:func:`~amortize.objectives.base.mean_log_ratio`),
            the temperature gradient of FastCLIP-v3's and NeuCLIP's robust global contrastive loss.
            ``robust`` needs ``rho`` and an objective that takes normalisers (``linearized``).
        chunk_size: None for one chunk (dense), or rows per chunk (exact, O(B * chunk) memory).
        checks: validation level of this module's inputs (``full``, ``shapes``, ``off``; None: the
            process default of :func:`amortize.functional.set_checks`).
        **objective_options: options of a named objective, e.g. ``pos_weight=1e-3``.

    Buffers ``epoch`` and ``max_epochs`` follow :meth:`start_epoch`, so the rho schedule resumes.
    """

    input_names: ClassVar[tuple[str, str]] = ("image_features", "text_features")
    """How error messages name the two feature inputs (the functional face's subclass: ``x``, ``y``)."""

    def __init__(
        self,
        objective: Union[str, Mapping[str, Any], Objective] = DEFAULT_OBJECTIVE,
        estimator: Optional[PartitionEstimator] = None,
        *,
        layout: Union[str, Layout] = DEFAULT_LAYOUT,
        rho: Union[None, float, dict, Schedule] = None,
        temperature: Temperature = "rescaled",
        chunk_size: Optional[int] = None,
        checks: Optional[str] = None,
        **objective_options: Any,
    ):
        super().__init__()
        if isinstance(objective, Objective):
            if objective_options:
                raise ValueError(f"options {sorted(objective_options)} go to the objective's constructor, "
                                 "not beside an objective object")
            self.objective = objective
        else:
            section = {"name": objective} if isinstance(objective, str) else dict(objective)
            self.objective = OBJECTIVES.build_section({**section, **objective_options}, key="objective")
        self.layout = build_layout(layout)
        self.objective.check_parts(self.layout, estimator=estimator is not None)
        if estimator is None and self.objective.accepts_normalizers:
            estimator = InBatchEstimator()
        K.chunk_size(chunk_size)
        self.estimator = estimator
        self.rho_schedule = build_schedule(rho)
        if temperature not in TEMPERATURE_FORMS:
            raise ValueError(f"unknown temperature {temperature!r}; choose one of {list(TEMPERATURE_FORMS)}")
        if temperature == "robust" and (self.rho_schedule is None or not self.objective.accepts_normalizers):
            raise ValueError("temperature 'robust' needs rho (0 for none) and an objective that takes normalisers "
                             f"and sums both sides (linearized); got rho={rho!r}, objective {self.objective.name!r}")
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.checks = None if checks is None else K.resolve(checks)
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self.register_buffer("max_epochs", torch.ones((), dtype=torch.long))

    @classmethod
    def from_sections(
        cls,
        objective: Section = DEFAULT_OBJECTIVE,
        estimator: Optional[Section] = None,
        *,
        layout: str = DEFAULT_LAYOUT,
        rho: Union[None, float, dict] = None,
        temperature: Temperature = "rescaled",
        chunk_size: Annotated[Optional[int], Range(lo=1)] = None,
        context: Optional[Mapping[str, Any]] = None,
    ) -> "ContrastiveLoss":
        """Build from recipe sections (``{name, **options}`` or names), as ``loss:`` in a recipe.

        Args:
            objective: the objective's section (or a built :class:`~amortize.objectives.Objective`).
            estimator: the estimator's section (or a built estimator), or None (in-batch where
                the objective takes one).
            layout: the layout's name (or a built :class:`~amortize.comm.Layout`).
            rho: the rescaling schedule (or a built :class:`~amortize.schedules.Schedule`).
            temperature: how rho enters, ``rescaled`` or ``robust`` (see the class).
            chunk_size: rows per chunk, or None.
            context: values the caller knows (``dim``: the embedding width, ``num_samples``: the
                dataset size); each is passed to an estimator constructor that names it in its
                signature, when the section does not set it.

        Raises:
            RecipeError: naming the ``loss.*`` key of an unknown component or option, a bad value,
                or a required option that neither the section nor the context gives.
        """
        known = dict(context or {})
        built = estimator  # a built estimator (a recipe's loss.estimator, bound and built as its own section)
        if isinstance(estimator, (str, Mapping)):
            built = ESTIMATORS.bind(estimator, "loss.estimator", known=tuple(known)).build(**known)
        if not isinstance(objective, Objective):
            objective = OBJECTIVES.bind(objective, "loss.objective").build()
        try:
            return cls(objective, built, layout=layout, rho=rho, temperature=temperature, chunk_size=chunk_size)
        except (TypeError, ValueError) as e:
            raise keyed("loss", e) from None

    @property
    def needs_index(self) -> bool:
        """Whether ``forward`` needs the dataset indices of the batch."""
        return bool(self.estimator is not None and self.estimator.needs_index)

    @property
    def rho(self) -> Optional[float]:
        """The temperature-rescaling constant of the current epoch (None without rescaling)."""
        if self.rho_schedule is None:
            return None
        return self.rho_schedule(int(self.epoch), int(self.max_epochs))

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        """Advance per-epoch schedules (rho here, the estimator's own) to ``epoch`` (0-based)."""
        K.epoch_counts(epoch, max_epochs)
        self.epoch.fill_(epoch)
        self.max_epochs.fill_(max(1, max_epochs))
        if self.estimator is not None:
            self.estimator.start_epoch(epoch, max_epochs)

    def _estimate(self, pairs: Pairs, part: Partition, index: Optional[Tensor]):
        """The estimator's normalisers of this process's rows and of every column, and its terms."""
        assert self.estimator is not None
        lay = pairs.layout
        n = lay.num_rows(pairs.rows)  # the rows the layout gives the estimator (all_rows)
        if self.estimator.reads_features:
            xs = lay.all_rows(pairs.x)
            ys = lay.all_columns(pairs.blocks, pairs.y)  # declared by the layout, not guessed from shapes
        else:  # zero-stride stand-ins: no communication for features nobody reads
            xs = pairs.x.detach()[:1].expand(n, pairs.x.shape[1])
            ys = pairs.y.detach()[:1].expand(n, pairs.y.shape[1])
        idx = None if index is None else lay.all_rows(index)
        extra = {}
        if getattr(self.estimator, "extra_inputs", ()):  # what it declares it reads besides the features and sums
            extra = declared_inputs(self.estimator, pairs.scale.detach(),
                                    None if pairs.bias is None else pairs.bias.detach(),
                                    pairs.num_negatives, lay.local_rows(), part.pos_weight,
                                    lay.topology)
        est = self.estimator(xs, ys, part.log_z_x, part.log_z_y, idx, **extra)
        got = (tuple(est.log_norm_x.shape), tuple(est.log_norm_y.shape))
        if pairs.checks != "off" and got != ((n,), (pairs.num_columns,)):  # a longer vector would be cut silently
            raise ValueError(f"{type(self.estimator).__name__} returned normalisers of shapes {got[0]} and {got[1]}; "
                             f"the layout gives it {n} rows and {pairs.num_columns} columns")
        off = pairs.row_offset
        return est.log_norm_x[off : off + pairs.rows], est.log_norm_y, est.terms

    def _step(self, image_features: Tensor, text_features: Tensor, scale: Tensor, bias: Optional[Tensor],
              index: Optional[Tensor]) -> tuple[Pairs, dict[str, Tensor], dict[str, Tensor]]:
        """The step in order: the pairs, their in-batch sums, the estimator, the objective's terms."""
        obj = self.objective
        pairs = obj.pairs(image_features, text_features, scale, bias, layout=self.layout,
                          chunk_size=self.chunk_size, checks=self.checks, names=self.input_names)
        part = partition(pairs, obj.partition_weight()) if obj.needs_partition else None
        lnx = lny = None
        diagnostics: dict[str, Tensor] = {}
        if self.estimator is not None:
            assert part is not None
            lnx, lny, diagnostics = self._estimate(pairs, part, index)
        if self.temperature == "robust":  # F of the normalisers the objective uses
            assert part is not None
            off, R = pairs.row_offset, pairs.rows
            rx = part.log_z_x[off : off + R] if lnx is None else lnx
            ry = (part.log_z_y if lny is None else lny)[off : off + R]  # the rows' positives' columns
            pos = kernels.positive_scores(pairs.x, pairs.y, pairs.scale, pairs.bias)
            diagnostics["log_ratio"] = mean_log_ratio(rx, ry, pos, pairs.num_negatives)
        return pairs, obj.terms(pairs, part, lnx, lny), diagnostics

    def terms(
        self,
        image_features: Tensor,
        text_features: Tensor,
        scale: Tensor,
        bias: Optional[Tensor] = None,
        index: Optional[Tensor] = None,
    ) -> dict[str, Tensor]:
        """The objective's named terms of this process's rows, WITH gradients (one step, as :meth:`forward`).

        Their sum is the loss before the temperature rescaling; for objectives that weigh the
        terms themselves (``amortize.functional.amortized_loss_terms``). The estimator runs (and
        updates its state in training mode) as in :meth:`forward`. Arguments as :meth:`forward`.
        """
        return self._step(image_features, text_features, scale, bias, index)[1]

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        scale: Tensor,
        bias: Optional[Tensor] = None,
        index: Optional[Tensor] = None,
    ) -> dict[str, Tensor]:
        """Compute the loss of this process's rows and its named terms.

        Args:
            image_features: (B, d) L2-normalised image features.
            text_features: (B, d) L2-normalised text features.
            scale: 0-d inverse temperature ``s`` (already exponentiated).
            bias: 0-d logit bias (SigLIP), or None.
            index: (B,) dataset indices, required by per-sample estimators.

        Returns:
            ``{"loss": ..., "scale": ..., ...}``: ``loss`` carries gradients (on several processes it
            is this process's share: the mean over processes equals the global single-process
            loss); the rest are detached: the objective's terms, the estimator's diagnostics,
            ``scale``, ``bias`` and ``rho``.
        """
        pairs, parts, diagnostics = self._step(image_features, text_features, scale, bias, index)
        loss = sum(parts.values())
        terms = {k: v.detach() for k, v in parts.items()}
        terms.update(diagnostics)
        rho = self.rho
        if rho is not None:
            loss = rescale_temperature(loss, pairs.scale, rho, diagnostics.get("log_ratio"))
            terms["rho"] = torch.tensor(rho, device=pairs.scale.device)
        terms["scale"] = pairs.scale.detach()
        if bias is not None:
            terms["bias"] = K.scalar_tensor(bias, pairs.x).detach()
        terms["loss"] = loss
        return terms

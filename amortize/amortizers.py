"""Amortizer networks: small models that predict ``log Z(u)`` from a (detached) embedding ``u``.

By Proposition 1 of AmorLIP, for unit-norm features ``exp(s <x, y>)`` is a Gaussian kernel, so
``Z(x) = E_y[exp(s <x, y>)]`` is linear in a random-Fourier feature map of ``x``. A light network
on the embedding can therefore represent ``log Z``; all heads here output ``log lambda`` (B,).

Every amortizer runs in float32, also under autocast, and takes ``(B, d)`` inputs of any float
dtype. Build one by name with :func:`build_amortizer`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from amortize.registry import Registry, Section

__all__ = [
    "ResidualMLPAmortizer",
    "LinearAmortizer",
    "RandomFourierAmortizer",
    "PrototypeNetwork",
    "prototype_log_normalizer",
    "AMORTIZERS",
    "register_amortizer",
    "build_amortizer",
]


def _check_dim(dim: int) -> None:
    if int(dim) < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")


class _Float32Head(nn.Module):
    """Base class: casts inputs to float32 and disables autocast around ``_forward``."""

    def forward(self, u: Tensor) -> Tensor:
        """Predict ``log lambda``.

        Args:
            u: (B, d) features (detached by the caller or not; any float dtype).

        Returns:
            (B,) float32 ``log lambda``.
        """
        if u.dim() != 2:
            raise ValueError(f"amortizer input must have shape (B, d), got {tuple(u.shape)}")
        with torch.autocast(device_type=u.device.type, enabled=False):
            return self._forward(u.float())

    def _forward(self, u: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ResidualMLPAmortizer(_Float32Head):
    """AmorLIP's residual MLP (spec section 4).

    ``z = LN_h(ReLU(W1 u)); z = LN_d(ReLU(W2 z)); z = ReLU(z + u); log_lambda = w^T z + b``
    with ``h = int(dim * width_factor)`` (0.5 in the medium recipe, 1.0 in the large one).

    Args:
        dim: embedding width ``d``.
        width_factor: ``f_d``; the hidden width is ``int(dim * width_factor)``.
        init_log_z: initial value of the output bias (a rough ``log Z``, e.g. ``log B``).
    """

    def __init__(self, dim: int, width_factor: float = 0.5, init_log_z: float = 0.0):
        super().__init__()
        _check_dim(dim)
        if not width_factor > 0:  # also refuses NaN
            raise ValueError(f"width_factor must be > 0, got {width_factor}")
        hidden = max(1, int(dim * width_factor))
        self.fc1 = nn.Linear(dim, hidden)
        self.ln1 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, 1)
        with torch.no_grad():
            self.out.bias.fill_(init_log_z)

    def _forward(self, u: Tensor) -> Tensor:
        z = self.ln1(torch.relu(self.fc1(u)))
        z = self.ln2(torch.relu(self.fc2(z)))
        z = torch.relu(z + u)
        return self.out(z).squeeze(-1)


class LinearAmortizer(_Float32Head):
    """A linear head ``log_lambda = w^T u + b``: the simplest amortizer, a useful ablation.

    Args:
        dim: embedding width ``d``.
        init_log_z: initial bias.
    """

    def __init__(self, dim: int, init_log_z: float = 0.0):
        super().__init__()
        _check_dim(dim)
        self.out = nn.Linear(dim, 1)
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.fill_(init_log_z)

    def _forward(self, u: Tensor) -> Tensor:
        return self.out(u).squeeze(-1)


class RandomFourierAmortizer(_Float32Head):
    """Proposition 1 made concrete: ``log lambda = log(softplus(w^T phi(u)) + eps) + b``.

    ``phi(u) = sqrt(2 / D) cos(Omega u + beta)`` with ``Omega ~ N(0, sigma^2 I)``, ``beta ~ U[0, 2 pi]``
    fixed (buffers), so that ``w^T phi(u)`` approximates a shift-invariant kernel average, as
    ``Z(x)`` is for unit features. The frequencies are frozen; only ``w`` and ``b`` learn. The
    partition sum is positive, so the linear readout passes through a softplus before the log.

    Args:
        dim: embedding width ``d``.
        num_features: number of random features ``D``.
        bandwidth: ``sigma``; for scores ``s <x, y>`` the kernel ``exp(-s |x - y|^2 / 2)`` has
            ``sigma = sqrt(s)``.
        init_log_z: initial bias (``b``).
        seed: seed of the random frequencies, so that a rebuilt head is identical.
    """

    def __init__(
        self,
        dim: int,
        num_features: int = 1024,
        bandwidth: float = 1.0,
        init_log_z: float = 0.0,
        seed: int = 0,
    ):
        super().__init__()
        _check_dim(dim)
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("omega", torch.randn(num_features, dim, generator=g) * bandwidth)
        self.register_buffer("phase", torch.rand(num_features, generator=g) * 2 * math.pi)
        self.readout = nn.Linear(num_features, 1)
        self.log_offset = nn.Parameter(torch.tensor(float(init_log_z)))
        with torch.no_grad():
            self.readout.weight.zero_()
            # softplus(b0) = 1 so that log lambda starts at init_log_z
            self.readout.bias.fill_(math.log(math.e - 1.0))

    def features(self, u: Tensor) -> Tensor:
        """Random Fourier features ``phi(u)``: (B, d) -> (B, D)."""
        D = self.omega.shape[0]
        return math.sqrt(2.0 / D) * torch.cos(u.float() @ self.omega.T + self.phase)

    def _forward(self, u: Tensor) -> Tensor:
        lin = self.readout(self.features(u)).squeeze(-1)
        return torch.log(nn.functional.softplus(lin) + 1e-6) + self.log_offset


def prototype_log_normalizer(u: Tensor, prototypes: Tensor, pos: Tensor, scale: Tensor, bias: Tensor,
                             eps: float = 0.0) -> Tensor:
    """NeuCLIP's normaliser on its shifted, mean scale: ``alpha_i = log(eps + mean_k exp(S_ik - S_ii))``.

    ``S_ik = s cos(u_i, w_k) + b`` scores row ``i`` against prototype ``k`` (the prototype rows
    are L2-normalised; ``u`` is unit-norm by contract) and ``S_ii`` is the row's positive score.

    Args:
        u: (B, d) anchor embeddings.
        prototypes: (m, d) prototypes of the other modality.
        pos: (B,) positive scores ``S_ii``.
        scale: 0-d inverse temperature ``s``.
        bias: 0-d logit bias ``b``.
        eps: NeuCLIP's ``eps`` (>= 0) inside the log.

    Returns:
        (B,) ``alpha`` (float32).
    """
    w = nn.functional.normalize(prototypes.float(), dim=-1)
    z = scale * (u.float() @ w.T) + bias - pos[:, None]
    lme = torch.logsumexp(z, dim=-1) - math.log(w.shape[0])
    if eps > 0:
        return torch.logaddexp(lme, torch.full_like(lme, math.log(eps)))
    return lme


class PrototypeNetwork(nn.Module):
    """NeuCLIP's normaliser network: ``m`` prototypes of the other modality, in our log-sum convention.

    NeuCLIP predicts ``alpha_i = log(eps + mean_k exp(S_ik - S_ii))`` (:func:`prototype_log_normalizer`);
    the toolkit's normalisers are log partition SUMS over the ``N`` negatives, ``log sum_{j != i}
    exp(S_ij)`` (plus ``c exp(S_ii)``), so this network returns ``alpha_i + log N + S_ii``
    (NeuCLIP spec section 7). Its ``eps`` then plays the role of the objective's ``pos_weight``
    divided by ``N``: ``eps = 0`` with ``pos_weight: 0`` excludes the positive exactly on both sides.

    It reads, besides the anchor embedding, the positive score, the scale, the bias and ``N``
    (:attr:`reads`): the loss module passes them. :meth:`restart` sets the prototypes to embeddings.

    Args:
        dim: embedding width ``d``.
        num_prototypes: ``m`` (NeuCLIP: 4096).
        eps: NeuCLIP's ``eps`` (>= 0).
    """

    reads = ("pos", "scale", "bias", "num_negatives")

    def __init__(self, dim: int, num_prototypes: int = 4096, eps: float = 0.0):
        super().__init__()
        _check_dim(dim)
        if int(num_prototypes) < 1:
            raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = float(eps)
        self.prototypes = nn.Parameter(nn.functional.normalize(torch.randn(int(num_prototypes), dim), dim=-1))

    @property
    def restart_size(self) -> int:
        """``m``, how many embeddings a restart takes."""
        return self.prototypes.shape[0]

    @torch.no_grad()
    def restart(self, rows: Tensor, at: Optional[Tensor] = None) -> None:
        """Set prototypes ``at`` (k,) (all: None) to ``rows`` (k, d), embeddings of the other modality."""
        k = self.prototypes.shape[0] if at is None else at.shape[0]
        if rows.shape != (k, self.prototypes.shape[1]):
            raise ValueError(f"restart needs ({k}, {self.prototypes.shape[1]}) rows, got {tuple(rows.shape)}")
        if at is None:
            self.prototypes.copy_(rows)
        else:
            self.prototypes[at] = rows.to(self.prototypes.dtype)

    def forward(self, u: Tensor, pos: Optional[Tensor] = None, scale: Union[float, Tensor] = 1.0,
                bias: Union[float, Tensor] = 0.0, num_negatives: float = 1.0) -> Tensor:
        """(B, d) anchors -> (B,) float32 ``log lambda``, a log partition sum over ``num_negatives`` negatives.

        Args:
            u: (B, d) anchor embeddings (any float dtype).
            pos: (B,) positive scores ``S_ii`` (None: zeros; they cancel when ``eps = 0``).
            scale: the inverse temperature ``s``.
            bias: the logit bias.
            num_negatives: ``N``, how many negatives the sums weigh (1: NeuCLIP's mean scale).
        """
        if u.dim() != 2 or u.shape[1] != self.prototypes.shape[1]:
            raise ValueError(f"prototype network input must have shape (B, {self.prototypes.shape[1]}), "
                             f"got {tuple(u.shape)}")
        with torch.autocast(device_type=u.device.type, enabled=False):
            u = u.float()
            pos = torch.zeros(u.shape[0], device=u.device) if pos is None else pos.float()
            scale = torch.as_tensor(scale, dtype=torch.float32, device=u.device)
            bias = torch.as_tensor(bias, dtype=torch.float32, device=u.device)
            alpha = prototype_log_normalizer(u, self.prototypes, pos, scale, bias, self.eps)
            return alpha + math.log(max(float(num_negatives), 1e-30)) + pos


AMORTIZERS: Registry[nn.Module] = Registry("amortizer")
"""Registry of amortizer networks: name -> constructor taking ``dim`` and keyword options.

Holds ``residual_mlp`` (:class:`ResidualMLPAmortizer`), ``linear`` (:class:`LinearAmortizer`),
``random_fourier`` (:class:`RandomFourierAmortizer`) and ``prototypes`` (:class:`PrototypeNetwork`, NeuCLIP); add one with :func:`register_amortizer`. A recipe
names it in ``loss.estimator.amortizer`` (a name, or a section ``{name: ..., <constructor options>}``).
"""
for _name, _cls in (("residual_mlp", ResidualMLPAmortizer), ("linear", LinearAmortizer),
                    ("random_fourier", RandomFourierAmortizer), ("prototypes", PrototypeNetwork)):
    AMORTIZERS.register(_name, _cls)


def register_amortizer(name: str, ctor: Callable[..., nn.Module]) -> None:
    """Register an amortizer constructor ``ctor(dim, **options) -> nn.Module`` under ``name``."""
    AMORTIZERS.register(name, ctor)


def build_amortizer(name: Section, dim: int, **options) -> nn.Module:
    """Build a registered amortizer.

    Args:
        name: a name in :data:`AMORTIZERS` (``residual_mlp``, ``linear``, ``random_fourier``), or a
            section ``{"name": ..., **options}``.
        dim: embedding width.
        **options: passed to the constructor (e.g. ``width_factor``, ``init_log_z``).

    Returns:
        The network, mapping (B, d) features to (B,) ``log lambda``.
    """
    if not isinstance(name, str):
        return AMORTIZERS.build_section({**dict(name), **options}, key="amortizer", dim=dim)
    return AMORTIZERS.build_section({"name": name, **options}, key="amortizer", dim=dim)

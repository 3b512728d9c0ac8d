"""The normaliser-network presets as data: each is :class:`NormalizerNetworkEstimator` with its own
defaults and its own flat names, and one signature generated from that data.

A :class:`Preset` holds its differences from a base (the constructor's defaults, or another
preset: ``amorlip_paper`` is ``amorlip_code`` with three changes), its flat aliases (``amortized``'s
``lr`` is ``fit.optimizer.lr``; ``neuclip``'s ``num_prototypes`` is ``network.num_prototypes``)
and the options its signature offers. :func:`preset_signature` makes the signature: a part's
default is the preset's section (a section given merges into it), an alias has the type and the
default of the option it stands for. A recipe's estimator section is bound against that
signature, so a typo in ``loss.estimator.fit.inner_stepz`` or ``loss.estimator.amortizer.widht``
fails at load under its key, and :func:`preset_options` turns what was bound (or what a Python
caller gave) into the one constructor's options. A preset's constructor carries its aliases as
``option_aliases``, so that the binding step writes its resolved options (what a stored recipe
holds) in one spelling (:func:`amortize.registry.bind`).

To add a preset: one entry in :data:`PRESET_TABLE`, and one line registering it
(:data:`amortize.estimators.ESTIMATORS`).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal, Mapping, Optional

from amortize.estimators.normalizer.estimator import NormalizerNetworkEstimator
from amortize.registry import Bound, Part, _signature, merge_section, part_of, section_name

__all__ = ["Preset", "PRESET_TABLE", "PRESETS", "preset_signature", "preset_options", "preset_constructor",
           "from_preset"]


@dataclass(frozen=True)
class Preset:
    """One preset of :class:`NormalizerNetworkEstimator`, as data.

    Attributes:
        parts: its values where they differ from ``base`` (a section merges into the base's).
        base: the preset it is written against (None: the constructor's defaults).
        aliases: flat option -> the dotted path of what it sets (``"lr": "fit.optimizer.lr"``;
            ``"amortizer": "network"``, a whole part).
        options: the options its signature offers first, in order (aliases and the constructor's
            own; empty: the constructor's, in its order); every other alias and option of the
            constructor follows, keyword-only, so an option added to the constructor is every
            preset's too.
        hides: the constructor's options its signature does not offer (those an alias stands for whole).
        narrowed: an annotation narrower than the constructor's, by option (the part kept).
    """

    parts: Mapping[str, Any] = field(default_factory=dict)
    base: Optional[str] = None
    aliases: Mapping[str, str] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    hides: tuple[str, ...] = ()
    narrowed: Mapping[str, Any] = field(default_factory=dict)


PRESET_TABLE: dict[str, Preset] = {
    # the AmorLIP authors' released command (README flags: fit_w_prev, model_ema_beta 0.92,
    # z_beta_max 0.8, update_ema_mlps_every_n_steps 2, lambda-lr 1e-3 x W, 3 inner steps, reinit per epoch)
    "amorlip_code": Preset({
        "network": {"name": "residual_mlp", "width_factor": 1.0},
        "fit": {"optimizer": {"name": "adam", "lr": 1e-3}, "lr_scaling": "world_size"},
        "epoch0_previous": "initial",
        "beta": {"name": "beta_warmup", "final": 0.8, "warmup_epochs": 16},
    }),
    # the AmorLIP paper: the encoders divide by the EMA target network (Eq. 6), Stage I fits the
    # targets blended with the previous epoch's network (Eq. 12); the inner lr does not follow W
    "amorlip_paper": Preset({"fit": {"lr_scaling": "none"}, "normalizer": "ema_target", "epoch0_previous": "none"},
                            base="amorlip_code"),
    # NeuCLIP (arXiv 2511.08417): m = 4096 prototypes, T_u = 10 AdaGrad steps on every batch of
    # exp(lse - alpha) + alpha (= reverse_kl), restarts from batch embeddings every T_r = 500 steps,
    # the encoders divided by the freshly fitted network (no EMA copy); the AdaGrad lr is not published (ours)
    "neuclip": Preset(
        {
            "network": {"name": "prototypes", "num_prototypes": 4096, "eps": 0.0},
            "fit": {"objective": "reverse_kl", "optimizer": {"name": "adagrad", "lr": 0.05}, "inner_steps": 10,
                    "clip_norm": None},
            "normalizer": "online",
            "cadence": "global",
            "reinit": "never",
            "restart": {"name": "batch_embeddings", "every": 500},
            "ema_every": 1,
            "beta": 0.0,
        },
        aliases={"num_prototypes": "network.num_prototypes", "eps": "network.eps", "lr": "fit.optimizer.lr",
                 "inner_steps": "fit.inner_steps", "restart_every": "restart.every"},
        options=("num_prototypes", "eps", "lr", "inner_steps", "restart_every", "seed", "network", "fit", "restart"),
    ),
    # the project's AmorLIP with the flat keys every recipe in recipes/ uses: the constructor's defaults
    "amortized": Preset(
        aliases={"amortizer": "network", "objective": "fit.objective", "log_l2_weight": "fit.log_l2_weight",
                 "lr": "fit.optimizer.lr", "inner_steps": "fit.inner_steps", "clip_norm": "fit.clip_norm",
                 "lr_scaling": "fit.lr_scaling"},
        options=("amortizer", "objective", "log_l2_weight", "lr", "inner_steps"),  # positional, as before
        hides=("network", "fit", "restart"),
        narrowed={"normalizer": Literal["previous_blend", "ema_target", "ema_ramp"]},  # those with an EMA copy
    ),
}
"""The presets, as data (see :class:`Preset`)."""

_CTOR = {n: p for n, p in _signature(NormalizerNetworkEstimator).parameters.items() if n not in ("self", "dim")}


def _full(name: str) -> dict[str, Any]:
    """Every option of preset ``name``: its base's, with its own differences merged in."""
    preset = PRESET_TABLE[name]
    base = _full(preset.base) if preset.base else {n: ({} if p.default is None and part_of(p.annotation) and
                                                        part_of(p.annotation).ctor else p.default)
                                                  for n, p in _CTOR.items()}
    return {n: merge_section(v, preset.parts[n]) if n in preset.parts else v for n, v in base.items()}


PRESETS: dict[str, dict[str, Any]] = {name: _full(name) for name in PRESET_TABLE}
"""Every preset's options, its base's and its own merged (``{option: value}``)."""


def _part(name: str, option: str) -> Optional[Part]:
    """The :class:`Part` of ``option`` in preset ``name``: the constructor's, merging into the preset's section."""
    part = part_of(_CTOR[option].annotation)
    return None if part is None else replace(part, base=PRESETS[name][option])


def _target(name: str, path: str) -> tuple[Any, Any]:
    """The annotation and the preset's value of the option at ``path`` (``fit.optimizer.lr``)."""
    head, *rest = path.split(".")
    annotation, value = _CTOR[head].annotation, PRESETS[name][head]
    for option in rest:
        part = part_of(annotation)
        if part.ctor is not None:
            ctor, options = part.ctor, dict(value or {})
        else:
            kind, options = section_name(value)
            ctor = part._registry().get(kind)
        param = _signature(ctor).parameters[option]
        annotation = param.annotation
        value = options.get(option, param.default)
    return annotation, value


def _annotated(annotation: Any, part: Optional[Part], narrowed: Any = None) -> Any:
    base = narrowed if narrowed is not None else (annotation.__origin__ if part is not None else annotation)
    return Annotated[base, part] if part is not None else base


def preset_signature(name: str, *, method: bool = False) -> inspect.Signature:
    """The signature of preset ``name``: ``dim``, then its options with the preset's defaults.

    Args:
        method: put ``self`` first (for a class whose ``__init__`` the preset is).
    """
    preset = PRESET_TABLE[name]
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] if method else []
    params.append(inspect.Parameter("dim", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int))
    first = preset.options or tuple(_CTOR)
    rest = [o for o in (*preset.aliases, *_CTOR) if o not in first and o not in preset.hides]
    for option, kind in [*((o, inspect.Parameter.POSITIONAL_OR_KEYWORD) for o in first),
                         *((o, inspect.Parameter.KEYWORD_ONLY) for o in rest)]:
        path = preset.aliases.get(option, option)
        annotation, default = _target(name, path)
        part = _part(name, path) if "." not in path else None
        params.append(inspect.Parameter(option, kind, default=copy.deepcopy(default),
                                        annotation=_annotated(annotation, part, preset.narrowed.get(option))))
    return inspect.Signature(params)


def _bound(part: Part, value: Any, key: str) -> Any:
    """``value`` as the constructor takes it: a section bound (merged into the preset's), else as it is."""
    if isinstance(value, Bound) or not part.is_section(value):
        return value
    return part.bind(value, key)


_DEFAULTS = {name: {option: (_bound(_part(name, option), value, option) if _part(name, option) else value)
                    for option, value in PRESETS[name].items()} for name in PRESET_TABLE}
"""Every preset's options as the constructor takes them, its sections bound once, when the preset is defined."""


def preset_options(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor's options (``dim`` aside) for preset ``name`` and the options ``given``.

    A given section (a recipe's arrives bound, at load, under its key) merges into the preset's;
    an alias given sets the option it stands for, after the parts; the rest is the preset's.
    """
    preset = PRESET_TABLE[name]
    out = dict(_DEFAULTS[name])
    for option, value in given.items():
        if option in preset.aliases:
            continue
        part = _part(name, option)
        out[option] = value if part is None else _bound(part, value, option)
    for alias, path in preset.aliases.items():
        if alias not in given:
            continue
        head, _, rest = path.partition(".")
        if rest:
            out[head] = out[head].with_option(rest, given[alias])
        else:
            out[head] = _bound(_part(name, head), given[alias], alias)
    return out


def preset_constructor(name: str):
    """Preset ``name`` as a function ``(dim, **its options) -> NormalizerNetworkEstimator`` with its signature."""
    signature = preset_signature(name)

    def build(*args: Any, **kwargs: Any) -> NormalizerNetworkEstimator:
        given = signature.bind(*args, **kwargs).arguments
        dim = given.pop("dim")
        return NormalizerNetworkEstimator(dim, **preset_options(name, given))

    build.__name__ = build.__qualname__ = name
    build.__signature__ = signature
    build.option_aliases = dict(PRESET_TABLE[name].aliases)  # its resolved options in one spelling (registry.bind)
    build.__doc__ = (f"The ``{name}`` preset of :class:`NormalizerNetworkEstimator` (see "
                     f":data:`amortize.estimators.normalizer.presets.PRESET_TABLE`); its options: "
                     f"{', '.join(list(signature.parameters)[1:])}.")
    return build


def from_preset(preset: str, dim: int, **overrides: Any) -> NormalizerNetworkEstimator:
    """A normaliser-network estimator from a preset with options of the constructor overridden.

    Args:
        preset: a name in :data:`PRESET_TABLE` (``amorlip_code``, ``amorlip_paper``, ``neuclip``, ``amortized``).
        dim: embedding width.
        **overrides: options of :class:`NormalizerNetworkEstimator`; a mapping merges into the
            preset's (``fit={"inner_steps": 5}`` keeps the preset's optimiser).
    """
    if preset not in PRESET_TABLE:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(sorted(PRESET_TABLE))}")
    for k in overrides:
        if k not in _CTOR:
            raise ValueError(f"unknown option {k!r} of preset {preset!r}; valid: {', '.join(sorted(_CTOR))}")
    return NormalizerNetworkEstimator(dim, **preset_options(preset, overrides))

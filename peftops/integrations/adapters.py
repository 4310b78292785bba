r"""Bottleneck adapters inside stock transformers models, placed as AdapterHub places them.

``apply_adapters(model, config)`` adds :class:`~peftops.nn.BottleneckAdapter` modules (so the
fused :func:`~peftops.bottleneck_adapter` op), or :class:`~peftops.nn.CompacterAdapter` modules
for the Compacter configs, to every transformer layer with forward hooks: no
base module is replaced or renamed, so the base ``state_dict`` keys and tensors are unchanged and
the adapters add keys of their own, ``<layer>.bottleneck_adapters.mh_adapter.*`` (after
attention) and ``<layer>.bottleneck_adapters.output_adapter.*`` (after the feed-forward block),
AdapterHub's location names. ``remove_adapters(model)`` takes them out again.

Configs, with AdapterHub's defaults (``adapters.configuration.adapter_config``), ``s`` the
scaling, ``f(v) = up(act(down(v)))``:

==================  ==========================  =========  ==============  =======  =========
``config``          AdapterHub class (paper)    locations  non_linearity   scaling  reduction
==================  ==========================  =========  ==============  =======  =========
``"seq_bn"``        ``SeqBnConfig`` (Pfeiffer)  output     ``"relu"``      1.0      16
``"double_seq_bn"`` ``DoubleSeqBnConfig``       both       ``"swish"``     1.0      16
                    (Houlsby)
``"par_bn"``        ``ParBnConfig`` (He et al.) output     ``"relu"``      4.0      2
``"compacter"``     ``CompacterConfig``         both       ``"gelu"``      1.0      32
                    (Mahabadi et al.)
``"compacter++"``   ``CompacterPlusPlusConfig`` output     ``"gelu"``      1.0      32
``"mam"``           ``MAMConfig`` (He et al.)   output     ``"relu"``      4.0      width 512
==================  ==========================  =========  ==============  =======  =========

The adapter width is ``int(hidden_size // reduction_factor)`` (at least 1), as AdapterHub's.

Compacter. ``"compacter"`` is ``DoubleSeqBnConfig`` with PHM projections and ``"compacter++"``
``SeqBnConfig`` with them (AdapterHub's classes derive from those), so each is placed as that
config is. The PHM options are AdapterHub's ``BnConfig`` defaults: ``phm_dim=4``, ``phm_rank=1``,
``shared_phm_rule=True`` (one :class:`~peftops.nn.PHMRule`, so one ``(n, n, n)`` Parameter, held
by every adapter of the model, down and up projections alike, as AdapterHub's
``shared_parameters``), ``factorized_phm_rule=False``; see :mod:`peftops.nn.compacter` for the
initialisation. The adapter width and the hidden size must be multiples of ``phm_dim``
(AdapterHub asserts the same): a small model needs a ``reduction_factor`` below 32.

MAM (He et al. 2022, "Towards a Unified View"): prefix tuning on every attention layer
(:func:`~peftops.apply_prefix_tuning`, ``prefix_length=30`` virtual tokens through a
reparameterisation MLP of width ``prefix_hidden=800``, AdapterHub's ``MAMConfig`` and the
paper's code) plus the ``"par_bn"`` adapter on the feed-forward block, with the paper's
bottleneck width 512 (AdapterHub's ``ParBnConfig`` halves the hidden size instead, the same
512 on the paper's 1024-wide BART-large); ``reduction_factor`` sets the width as for the other
configs. :func:`remove_adapters` removes both parts.

Placement. For a sublayer (attention or feed-forward) with residual input ``x`` (what is added
back around it) and output ``h`` (before that addition), AdapterHub's ``Adapter.pre_forward`` /
``forward`` / ``post_forward`` with these configs compute, and this module computes the same:

* post-LN layers (BERT: ``y = LN(x + h)``), with the layer's own ``LN``:

  - ``seq_bn`` (``original_ln_before``, ``residual_before_ln=True``):
    ``y = LN(x + h + s f(LN(x + h)))``, the same ``LN`` twice;
  - ``double_seq_bn``: ``y = LN(x + h + s f(h))`` at both locations;
  - ``par_bn``: ``y = LN(x + h + s f(x))``, ``x`` being the feed-forward block's input;

* pre-LN layers (Llama, Qwen2, Mistral, GPT-2: ``y = x + h``, ``h = sublayer(norm(x))``),
  where AdapterHub's own model code passes no layer norm:

  - ``seq_bn``: ``y = z + s f(z)``, ``z = x + h``: after the residual addition;
  - ``double_seq_bn``: ``y = x + h + s f(h)`` at both locations;
  - ``par_bn``: ``y = x + h + s f(x)``: from the residual stream ``x``, before the block's norm
    (not the normalised input the feed-forward block sees).

Each is one :class:`~peftops.nn.BottleneckAdapter` call on the sublayer output ``h``:
``double_seq_bn`` the serial form ``h + s f(h)``; ``seq_bn`` and ``par_bn`` the parallel form
(``parallel=True``), whose residual is ``h`` and whose input is ``LN(x + h)``, ``x + h`` or
``x``: in AdapterHub's Pfeiffer adapter too the residual around the bottleneck (``h``, taken
before the norm) is not its input. ``x`` is read by a forward pre-hook on the module that
receives it (the block's pre-norm, or BERT's ``BertSelfOutput``/``BertOutput``), ``h`` is
changed by a forward hook on the module that returns it (the attention or MLP module, or BERT's
output dropout, after which AdapterHub's BERT code inserts its adapters). Dropout inside the
model therefore acts where it acts under AdapterHub. The hooks run again when gradient
checkpointing recomputes a layer, and under ``generate()`` with or without a KV cache.

Banks (``apply_adapters(model, config, capacity=N)``, not for Compacter or MAM): each site holds
a :class:`~peftops.nn.MultiBottleneckAdapter` of ``N`` slots instead, with the same placement,
non-linearity, scaling and residual handling, and each row of a batch goes through its own
adapter or none. :func:`add_bottleneck` / :func:`remove_bottleneck` fill and free a slot at every
site (no parameter changes shape), :func:`set_bottleneck_ids` names each row's adapter. A row
without one computes exactly what the base model computes; each adapter's gradient is that of
its own rows, and an adapter absent from the batch gets zeros. The slot names travel in the
``state_dict`` (the banks' extra state), so a model given ``apply_adapters`` with the same
``capacity`` loads them back.

Where this differs from AdapterHub, because peftops' module or a generic model decides:

* initialisation: the up projection starts at zero, so a fresh adapter leaves the model's
  outputs exactly as they were (AdapterHub's ``init_weights="bert"``, the default of
  ``seq_bn``/``double_seq_bn``, draws it from N(0, 0.02), which perturbs the model from the
  first step). The down projection is initialised as AdapterHub's: N(0, 0.02) weights for
  ``seq_bn``/``double_seq_bn``, Kaiming-uniform (``mam_adapter``) for ``par_bn``; zero biases;
* the layer structure is read from the layer classes in :data:`LAYERS`, not from an
  ``adapter_interface``, so an architecture outside them is a ``TypeError``, never a guess: a
  layer with the same attribute names can apply its norms elsewhere (Gemma2's, OLMo2's
  ``post_attention_layernorm`` follow the attention);
* not offered: ``ln_before``/``ln_after``, gating, ``leave_out``, per-layer reduction factors,
  learned scaling, adapter dropout, invertible and cross-attention adapters, PHM options beyond
  those of :func:`apply_adapters` (:mod:`peftops.nn.compacter` lists them); ``non_linearity`` is one of :data:`NON_LINEARITIES` (transformers' names as AdapterHub takes
  them, or peftops').
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..distributed import check_not_wrapped
from ..nn._base import positive_int, strict_bool
from ..nn.bottleneck_adapter import BottleneckAdapter
from ..nn.compacter import CompacterAdapter, PHMRule
from ..nn.multi_bottleneck_adapter import MultiBottleneckAdapter
from ..nn.surgery import mark_only_adapters_trainable
from .prefix_tuning import apply_prefix_tuning, remove_prefix_tuning

__all__ = [
    "CONFIGS",
    "LAYERS",
    "NON_LINEARITIES",
    "PHM_DEFAULTS",
    "PREFIX_DEFAULTS",
    "add_bottleneck",
    "apply_adapters",
    "remove_adapters",
    "remove_bottleneck",
    "set_bottleneck_ids",
]

# Attribute holding each layer's adapters (an nn.ModuleDict keyed by AdapterHub's location).
ADAPTERS_ATTR = "bottleneck_adapters"
# Model attribute holding what remove_adapters() needs (hook handles, requires_grad flags).
_STATE = "_peftops_bottleneck_adapters"


@dataclass(frozen=True)
class _Config:
    mh_adapter: bool  # after the attention block
    output_adapter: bool  # after the feed-forward block
    kind: str  # "seq" (Pfeiffer), "double" (Houlsby, serial on h), "par" (parallel from x)
    non_linearity: str
    reduction_factor: float
    scaling: float
    init: str  # AdapterHub's init_weights for the down projection: "bert" or "mam_adapter"
    phm: bool = False  # Compacter: PHM projections
    prefix: bool = False  # MAM: prefix tuning as well
    width: int | None = None  # a fixed default width instead of hidden // reduction_factor


CONFIGS: dict[str, _Config] = {
    "seq_bn": _Config(False, True, "seq", "relu", 16, 1.0, "bert"),
    "double_seq_bn": _Config(True, True, "double", "swish", 16, 1.0, "bert"),
    "par_bn": _Config(False, True, "par", "relu", 2, 4.0, "mam_adapter"),
    "compacter": _Config(True, True, "double", "gelu", 32, 1.0, "bert", phm=True),
    "compacter++": _Config(False, True, "seq", "gelu", 32, 1.0, "bert", phm=True),
    "mam": _Config(False, True, "par", "relu", 2, 4.0, "mam_adapter", prefix=True, width=512),
}

# AdapterHub's BnConfig PHM defaults; MAMConfig's prefix (PrefixTuningConfig(bottleneck_size=800)).
PHM_DEFAULTS = {"phm_dim": 4, "phm_rank": 1, "shared_phm_rule": True, "factorized_phm_rule": False}
PREFIX_DEFAULTS = {"prefix_length": 30, "prefix_hidden": 800}

# transformers' activation names (which AdapterHub looks up), and peftops', to the op's.
NON_LINEARITIES = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "swish": "silu",
    "silu": "silu",
}


@dataclass(frozen=True)
class _Site:
    """One adapter location of a layer, as dotted paths inside the layer."""

    output: str  # module returning the sublayer output h (a tensor, or a tuple with h first)
    residual: str  # module called with the residual x
    residual_arg: int  # x's position in that call
    residual_kwarg: str  # x's name, if passed by keyword
    layer_norm: str | None  # post-LN: the norm applied to x + h; None for pre-LN layers


_PRE_LN_DECODER = {
    "mh_adapter": _Site("self_attn", "input_layernorm", 0, "hidden_states", None),
    "output_adapter": _Site("mlp", "post_attention_layernorm", 0, "hidden_states", None),
}

# Layer classes (by name: transformers is imported only by the caller) whose forward was read
# (transformers 5.x) and whose adapters match AdapterHub's code for that model.
LAYERS: dict[str, dict[str, _Site]] = {
    "LlamaDecoderLayer": _PRE_LN_DECODER,
    "Qwen2DecoderLayer": _PRE_LN_DECODER,
    "MistralDecoderLayer": _PRE_LN_DECODER,
    "GPT2Block": {
        "mh_adapter": _Site("attn", "ln_1", 0, "input", None),
        "output_adapter": _Site("mlp", "ln_2", 0, "input", None),
    },
    "BertLayer": {
        "mh_adapter": _Site(
            "attention.output.dropout", "attention.output", 1, "input_tensor", "attention.output.LayerNorm"
        ),
        "output_adapter": _Site("output.dropout", "output", 1, "input_tensor", "output.LayerNorm"),
    },
}


@dataclass
class _State:
    config: str
    prefix: bool = False  # apply_prefix_tuning was called by apply_adapters (MAM)
    capacity: int | None = None  # banks of this many slots (MultiBottleneckAdapter) at every site
    init: str = "bert"  # the down projection's initialisation, for add_bottleneck
    handles: list[RemovableHandle] = field(default_factory=list)
    layers: list[nn.Module] = field(default_factory=list)
    requires_grad: dict[int, tuple[nn.Parameter, bool]] = field(default_factory=dict)


class _Residual:
    """The residual input ``x`` of one sublayer call, from the pre-hook to the output hook."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Tensor | None = None


def _capture(store: _Residual, site: _Site, module: nn.Module, args: tuple, kwargs: dict) -> None:
    store.value = args[site.residual_arg] if len(args) > site.residual_arg else kwargs[site.residual_kwarg]


def _adapt(
    adapter: BottleneckAdapter | CompacterAdapter | MultiBottleneckAdapter,
    kind: str,
    store: _Residual | None,
    layer_norm: nn.Module | None,
    module: nn.Module,
    args: tuple,
    output: Any,
) -> Any:
    h = output[0] if isinstance(output, tuple) else output
    if isinstance(adapter, MultiBottleneckAdapter) and adapter._batch_ids is None:
        # The module's own message names its method; a model's user sets ids through the model.
        raise ValueError(
            "apply_adapters(capacity=N): ids: expected the batch's adapters, set with "
            "set_bottleneck_ids(model, ids) before running the model, got none"
        )
    if kind == "double":
        new = adapter(h)
    else:
        assert store is not None
        x, store.value = store.value, None  # do not keep the activation alive past the call
        if x is None:
            raise RuntimeError(
                f"apply_adapters: {type(module).__name__} ran without its residual input having been seen "
                "(the layer was called in a way peftops does not know); remove_adapters(model) and report it"
            )
        # residual by keyword: a bank's second positional argument is its adapter ids.
        if kind == "par":
            new = adapter(x, residual=h)
        else:  # seq: the adapter reads the sublayer's sum with its residual, normalised if post-LN
            z = x + h
            new = adapter(z if layer_norm is None else layer_norm(z), residual=h)
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"apply_adapters: {name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"apply_adapters: {name}: expected a finite number, got {value}")
    return value


def _resolve(config: object, reduction_factor: object, non_linearity: object, scaling: object) -> _Config:
    if not isinstance(config, str):
        raise TypeError(
            f"apply_adapters: config: expected a str, one of {sorted(CONFIGS)}, got {type(config).__name__}"
        )
    if config not in CONFIGS:
        raise ValueError(f"apply_adapters: config: expected one of {sorted(CONFIGS)}, got {config!r}")
    base = CONFIGS[config]
    reduction = base.reduction_factor if reduction_factor is None else _real("reduction_factor", reduction_factor)
    if reduction <= 0:
        raise ValueError(f"apply_adapters: reduction_factor: expected a number > 0, got {reduction}")
    act = base.non_linearity if non_linearity is None else non_linearity
    if not isinstance(act, str):
        raise TypeError(f"apply_adapters: non_linearity: expected a str, got {type(act).__name__}")
    if act.lower() not in NON_LINEARITIES:
        raise ValueError(f"apply_adapters: non_linearity: expected one of {sorted(NON_LINEARITIES)}, got {act!r}")
    scale = base.scaling if scaling is None else _real("scaling", scaling)
    return _Config(
        base.mh_adapter,
        base.output_adapter,
        base.kind,
        NON_LINEARITIES[act.lower()],
        reduction,
        scale,
        base.init,
        base.phm,
        base.prefix,
        base.width if reduction_factor is None else None,
    )


def _options(config: str, cfg: _Config, given: dict[str, object], defaults: Mapping[str, object], on: bool) -> dict:
    """The config's options (PHM or prefix) with the caller's overrides, checked; an override
    for a config without them is an error, never ignored."""
    passed = {k: v for k, v in given.items() if v is not None}
    if not on:
        if passed:
            raise ValueError(
                f"apply_adapters: {next(iter(passed))}: expected None for config {config!r} (it applies to "
                f"{'compacter / compacter++' if 'phm_dim' in defaults else 'mam'} only), got {next(iter(passed.values()))!r}"
            )
        return {}
    out = {**defaults, **passed}
    for name, value in out.items():
        if isinstance(defaults[name], bool):
            strict_bool("apply_adapters", name, value)
        else:
            positive_int("apply_adapters", name, value)
    return out


def _find_layers(model: nn.Module) -> list[tuple[str, nn.Module, dict[str, _Site]]]:
    layers = [(name, m, LAYERS[type(m).__name__]) for name, m in model.named_modules() if type(m).__name__ in LAYERS]
    if not layers:
        raise TypeError(
            f"apply_adapters: model: {type(model).__name__} has no transformer layer peftops knows where to put "
            f"adapters in: expected layers of class {', '.join(LAYERS)} (Llama, Qwen2, Mistral, GPT-2, BERT)"
        )
    for name, layer, sites in layers:
        for site in sites.values():
            for path in (site.output, site.residual, site.layer_norm):
                if path is not None and not _has(layer, path):
                    raise TypeError(
                        f"apply_adapters: model: {type(model).__name__}: layer {name!r} ({type(layer).__name__}) "
                        f"has no submodule {path!r}, which peftops needs to place adapters in it"
                    )
    return layers


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _hidden_size(model: nn.Module, layer: nn.Module, sites: dict[str, _Site]) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(size, int):
        return size
    norm = layer.get_submodule(sites["output_adapter"].residual)
    weight = getattr(norm, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 1:
        return weight.shape[0]
    raise TypeError(f"apply_adapters: model: {type(model).__name__} has no config.hidden_size to size the adapters by")


def _init_down(adapter: BottleneckAdapter, init: str) -> None:
    with torch.no_grad():
        if init == "bert":
            nn.init.normal_(adapter.down.weight, mean=0.0, std=0.02)
        else:
            nn.init.kaiming_uniform_(adapter.down.weight, a=math.sqrt(5))
        nn.init.zeros_(adapter.down.bias)


def _width(cfg: _Config, d: int) -> int:
    return cfg.width if cfg.width is not None else max(1, int(d // cfg.reduction_factor))


def apply_adapters(
    model: nn.Module,
    config: str = "seq_bn",
    reduction_factor: float | None = None,
    non_linearity: str | None = None,
    *,
    scaling: float | None = None,
    phm_dim: int | None = None,
    phm_rank: int | None = None,
    shared_phm_rule: bool | None = None,
    factorized_phm_rule: bool | None = None,
    prefix_length: int | None = None,
    prefix_hidden: int | None = None,
    capacity: int | None = None,
) -> nn.Module:
    """Add bottleneck adapters to every layer of a transformers ``model``, in place, and return it.

    ``config``: ``"seq_bn"`` (Pfeiffer), ``"double_seq_bn"`` (Houlsby), ``"par_bn"`` (He et
    al.), ``"compacter"`` / ``"compacter++"`` (Mahabadi et al.) or ``"mam"`` (He et al.: prefix
    tuning plus ``par_bn``); see the module docstring for where each adapter sits.
    ``reduction_factor``, ``non_linearity`` and ``scaling`` override the config's defaults (16 /
    ``"relu"`` / 1.0 for ``seq_bn``; ``None`` keeps the default); ``phm_dim``, ``phm_rank``,
    ``shared_phm_rule``, ``factorized_phm_rule`` (Compacter only) and ``prefix_length``,
    ``prefix_hidden`` (MAM only) likewise. Every base parameter is frozen, the adapters (and a
    MAM prefix) are trainable (:func:`~peftops.mark_only_adapters_trainable`), and the adapters
    start as the identity: the model computes what it computed before until they are trained
    (MAM's prefix, like any prefix, changes the outputs from the start).

    ``capacity=N`` (``seq_bn``, ``double_seq_bn``, ``par_bn``): every site holds a
    :class:`~peftops.nn.MultiBottleneckAdapter` bank of ``N`` empty slots of width up to the
    config's, placed, activated and scaled as the single adapter, so that each row of a batch
    goes through its own adapter or none: fill slots with :func:`add_bottleneck`, free them with
    :func:`remove_bottleneck`, name each row's adapter with :func:`set_bottleneck_ids` (a model
    with banks refuses to run before that). ``None`` (the default): one adapter per site.

    Supported layers: :data:`LAYERS` (Llama, Qwen2, Mistral, GPT-2, BERT); a model without any
    is a ``TypeError`` naming its class. A model that has adapters already is a ``ValueError``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_adapters: model: expected a torch.nn.Module, got {type(model).__name__}")
    check_not_wrapped("apply_adapters", model)
    cfg = _resolve(config, reduction_factor, non_linearity, scaling)
    phm = _options(
        config,
        cfg,
        {
            "phm_dim": phm_dim,
            "phm_rank": phm_rank,
            "shared_phm_rule": shared_phm_rule,
            "factorized_phm_rule": factorized_phm_rule,
        },
        PHM_DEFAULTS,
        cfg.phm,
    )
    prefix = _options(
        config, cfg, {"prefix_length": prefix_length, "prefix_hidden": prefix_hidden}, PREFIX_DEFAULTS, cfg.prefix
    )
    if capacity is not None:
        capacity = positive_int("apply_adapters", "capacity", capacity)
        if cfg.phm or cfg.prefix:
            # A Compacter's projections come from a shared PHM rule and MAM's prefix is one for all
            # rows: neither has per-row slots.
            raise ValueError(
                f"apply_adapters: capacity: expected None for config {config!r} (banks are built for "
                f"seq_bn / double_seq_bn / par_bn only), got {capacity}"
            )
    if _STATE in model.__dict__:
        raise ValueError(
            f"apply_adapters: model: already has {model.__dict__[_STATE].config!r} adapters; "
            "call remove_adapters(model) first"
        )
    layers = _find_layers(model)
    for _, layer, _ in layers:
        if ADAPTERS_ATTR in layer._modules or hasattr(layer, ADAPTERS_ATTR):
            raise ValueError(f"apply_adapters: model: a layer already has an attribute {ADAPTERS_ATTR!r}")
    if phm:
        # Checked for every layer before any is touched: AdapterHub asserts the same divisibility.
        n = phm["phm_dim"]
        for _, layer, sites in layers:
            d = _hidden_size(model, layer, sites)
            r = _width(cfg, d)
            if d % n:
                raise ValueError(f"apply_adapters: phm_dim: expected a divisor of the hidden size {d}, got {n}")
            if r % n:
                raise ValueError(
                    f"apply_adapters: reduction_factor: expected one giving an adapter width that is a multiple of "
                    f"phm_dim={n}, got {cfg.reduction_factor:g} (width {d} // {cfg.reduction_factor:g} = {r})"
                )
    state = _State(config=config, capacity=capacity, init=cfg.init)
    state.requires_grad = {id(p): (p, p.requires_grad) for p in model.parameters()}
    if prefix:
        # First, so that a model prefix tuning refuses is left untouched.
        apply_prefix_tuning(model, prefix["prefix_length"], reparam_hidden=prefix["prefix_hidden"])
        state.prefix = True
    locations = [loc for loc, on in (("mh_adapter", cfg.mh_adapter), ("output_adapter", cfg.output_adapter)) if on]
    shared_rule: PHMRule | None = None
    for _, layer, sites in layers:
        d = _hidden_size(model, layer, sites)
        r = _width(cfg, d)
        adapters = nn.ModuleDict()
        for loc in locations:
            site = sites[loc]
            out_module = layer.get_submodule(site.output)
            ref = next(out_module.parameters(), None)
            if ref is None:  # BERT's dropout: the layer's own dtype and device
                ref = next(layer.parameters(), None)
            device, dtype = (None, None) if ref is None else (ref.device, ref.dtype)
            adapter: BottleneckAdapter | CompacterAdapter | MultiBottleneckAdapter
            if capacity is not None:
                adapter = MultiBottleneckAdapter(
                    d,
                    capacity,
                    r,
                    activation=cfg.non_linearity,
                    scale=cfg.scaling,
                    parallel=cfg.kind != "double",
                    device=device,
                    dtype=dtype,
                )
            elif phm:
                if phm["shared_phm_rule"] and shared_rule is None:
                    shared_rule = PHMRule(phm["phm_dim"], phm["factorized_phm_rule"], device=device, dtype=dtype)
                adapter = CompacterAdapter(
                    d,
                    r,
                    activation=cfg.non_linearity,
                    scale=cfg.scaling,
                    parallel=cfg.kind != "double",
                    phm_dim=phm["phm_dim"],
                    phm_rank=phm["phm_rank"],
                    phm_rule=shared_rule,
                    factorized_phm_rule=phm["factorized_phm_rule"],
                    device=device,
                    dtype=dtype,
                )
            else:
                adapter = BottleneckAdapter(
                    d,
                    r,
                    activation=cfg.non_linearity,
                    scale=cfg.scaling,
                    parallel=cfg.kind != "double",
                    device=device,
                    dtype=dtype,
                )
                _init_down(adapter, cfg.init)
            adapters[loc] = adapter
            store = None
            if cfg.kind != "double":
                store = _Residual()
                state.handles.append(
                    layer.get_submodule(site.residual).register_forward_pre_hook(
                        partial(_capture, store, site), with_kwargs=True
                    )
                )
            norm = None if site.layer_norm is None else layer.get_submodule(site.layer_norm)
            state.handles.append(out_module.register_forward_hook(partial(_adapt, adapter, cfg.kind, store, norm)))
        layer.add_module(ADAPTERS_ATTR, adapters)
        state.layers.append(layer)
    model.__dict__[_STATE] = state
    return mark_only_adapters_trainable(model)


def remove_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_adapters`: hooks and adapter modules (and MAM's prefix) removed, ``requires_grad`` of the
    base parameters as it was before, the ``state_dict`` the base model's again."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"remove_adapters: model: expected a torch.nn.Module, got {type(model).__name__}")
    state = model.__dict__.get(_STATE)
    if state is None:
        raise ValueError("remove_adapters: model: expected a model given to apply_adapters, got one without adapters")
    for handle in state.handles:
        handle.remove()
    for layer in state.layers:
        delattr(layer, ADAPTERS_ATTR)
    if state.prefix:
        remove_prefix_tuning(model)
    for p, flag in state.requires_grad.values():
        p.requires_grad_(flag)
    del model.__dict__[_STATE]
    return model


# -- adapter banks (apply_adapters(..., capacity=N)) ------------------------------------------


def _banks(owner: str, model: object) -> list[MultiBottleneckAdapter]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model: expected a torch.nn.Module, got {type(model).__name__}")
    state = model.__dict__.get(_STATE)
    if state is None or state.capacity is None:
        got = "one without adapters" if state is None else f"one with single {state.config!r} adapters"
        raise ValueError(f"{owner}: model: expected a model given to apply_adapters(..., capacity=N), got {got}")
    banks = [bank for layer in state.layers for bank in getattr(layer, ADAPTERS_ATTR).values()]
    first = banks[0].adapters
    for bank in banks[1:]:
        if bank.adapters != first:
            raise ValueError(
                f"{owner}: model: the sites disagree on their slots ({first} and {bank.adapters}): add and remove "
                "bottleneck adapters through the model (add_bottleneck / remove_bottleneck), not site by site"
            )
    return banks


def _name(owner: str, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{owner}: name: expected a non-empty str, got {name!r}")
    return name


@torch.no_grad()
def add_bottleneck(model: nn.Module, name: str, r: int | None = None) -> int:
    """Add adapter ``name`` of width ``r`` (default: the sites' ``r_max``, the config's width) to
    every bank of a model given to ``apply_adapters(..., capacity=N)``, in the same free slot of
    every site, and return that slot index. The adapter is initialised as the single adapter of
    the config: down projection as ``apply_adapters``' (N(0, 0.02), or Kaiming-uniform for
    ``par_bn``), biases and up projection zero, so a fresh adapter changes no output. No
    parameter changes shape (the slots are fixed), so a compiled model does not recompile."""
    owner = "add_bottleneck"
    banks = _banks(owner, model)
    name = _name(owner, name)
    slots = banks[0].adapters
    if name in slots:
        raise ValueError(f"{owner}: name: expected a new adapter name, got {name!r} (already in slot {slots[name]})")
    r_max = min(bank.r_max for bank in banks)
    rank = r_max if r is None else positive_int(owner, "r", r)
    if rank > r_max:
        raise ValueError(f"{owner}: r: expected at most r_max={r_max} (the config's width), got {rank}")
    capacity = banks[0].capacity
    if len(slots) >= capacity:
        raise ValueError(
            f"{owner}: model: all {capacity} slots are in use ({sorted(slots)}); remove_bottleneck one first"
        )
    init = model.__dict__[_STATE].init
    for bank in banks:
        slot = bank.add_adapter(name, rank)
        w = bank.down_weight[slot, :rank]
        # The single adapter's initialisation (_init_down), in place of the module's nn.Linear one.
        if init == "bert":
            nn.init.normal_(w, mean=0.0, std=0.02)
        else:
            w.copy_(nn.init.kaiming_uniform_(torch.empty_like(w), a=math.sqrt(5)))
        bank.down_bias[slot].zero_()
    # Every bank fills its first free slot and the banks agreed before: the same slot everywhere.
    return banks[0].adapter_id(name)


@torch.no_grad()
def remove_bottleneck(model: nn.Module, name: str) -> nn.Module:
    """Free adapter ``name``'s slot at every site (zeroed, shapes unchanged) and return ``model``.
    Ids naming that slot (set by :func:`set_bottleneck_ids` before) are refused in eager mode from
    then on; under ``torch.compile`` or CUDA graph capture their rows get no adapter."""
    owner = "remove_bottleneck"
    banks = _banks(owner, model)
    name = _name(owner, name)
    if name not in banks[0].adapters:
        raise ValueError(
            f"{owner}: name: expected one of the model's adapters {sorted(banks[0].adapters)}, got {name!r}"
        )
    for bank in banks:
        bank.remove_adapter(name)
    return model


def set_bottleneck_ids(model: nn.Module, ids: Tensor | Sequence[str | int | None] | None) -> nn.Module:
    """Name the adapter of each row of the following batches at every site, until set again,
    and return ``model``.

    ``ids``: one entry per row of the batch actually run (``(B,)``; under ``generate()`` with a
    KV cache the decode steps run the same ``B`` rows, so the ids hold for the whole call; beam
    search and ``num_return_sequences`` expand the batch, and need ids for the expanded rows):
    adapter names, slot ints or ``None`` (the row gets no adapter: it computes exactly what the
    base model computes), or a signed integer tensor of slot indices with ``-1`` for none.
    A tensor is kept by reference, the same object at every site: a CUDA graph captured once
    reads whatever ids are copied into it later (``ids.copy_(new)``), so it must live on the
    sites' device (a model spread over devices takes names or ints) and keep its shape.
    ``ids=None`` clears the ids: the model refuses to run until they are set again. Names and slot ints, and the values of a tensor when it
    is set, are checked here (unknown names, free or out-of-range slots are a ``ValueError``);
    a tensor's later contents are checked by the next eager forward, and not under
    ``torch.compile`` or capture, where a free or out-of-range slot's rows get no adapter.
    """
    owner = "set_bottleneck_ids"
    banks = _banks(owner, model)
    slots = banks[0].adapters
    capacity = banks[0].capacity
    if ids is None:
        for bank in banks:
            bank.set_batch_adapters(None)
        return model
    if isinstance(ids, Tensor):
        if ids.is_floating_point() or ids.is_complex() or not ids.dtype.is_signed:
            raise TypeError(f"{owner}: ids: expected a signed integer tensor (-1 = no adapter), got {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"{owner}: ids: expected one id per row, shape (B,), got shape {tuple(ids.shape)}")
        devices = sorted({str(bank.down_weight.device) for bank in banks})
        if devices != [str(ids.device)]:
            # Kept by reference, the tensor cannot be moved to the sites: the op would fail later.
            raise ValueError(
                f"{owner}: ids: expected a tensor on the adapters' device {', '.join(devices)}"
                f"{' (the model is spread over devices: pass names or slot ints)' if len(devices) > 1 else ''}, "
                f"got one on {ids.device}"
            )
        if not (ids.is_cuda and torch.cuda.is_current_stream_capturing()) and ids.numel():
            in_use = torch.zeros(capacity + 1, dtype=torch.bool)
            in_use[list(slots.values())] = True
            in_use[capacity] = True  # -1, read through index -1 below
            values = ids.cpu()
            bad = (values < -1) | (values >= capacity)
            if not bad.any():
                bad = ~in_use[values.long()]
            if bad.any():
                raise ValueError(
                    f"{owner}: ids: expected slots in use {sorted(slots.values())} or -1 (no adapter), "
                    f"got {int(values[bad][0])}" + ("" if -1 <= int(values[bad][0]) < capacity else " (out of range)")
                )
        shared = ids
        for bank in banks:
            bank.set_batch_adapters(shared)
        return model
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise TypeError(
            f"{owner}: ids: expected a list of adapter names / slot ints / None, or an integer tensor, "
            f"got {type(ids).__name__}"
        )
    refs = list(ids)
    for ref in refs:
        if isinstance(ref, str) and ref not in slots:
            raise ValueError(f"{owner}: ids: expected adapter names in {sorted(slots)}, got {ref!r}")
        if isinstance(ref, int) and not isinstance(ref, bool) and ref != -1 and ref not in slots.values():
            raise ValueError(f"{owner}: ids: expected slots in use {sorted(slots.values())} or -1, got {ref}")
        if not (ref is None or isinstance(ref, str) or (isinstance(ref, int) and not isinstance(ref, bool))):
            raise TypeError(f"{owner}: ids: expected adapter names, slot ints or None, got {type(ref).__name__}")
    # One tensor per device, shared by the banks on it, as a tensor passed in would be.
    per_device: dict[torch.device, Tensor] = {}
    for bank in banks:
        device = bank.down_weight.device
        if device not in per_device:
            per_device[device] = bank.adapter_ids(refs, device=device)
        bank.set_batch_adapters(per_device[device])
    return model

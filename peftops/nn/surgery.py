"""Model surgery: explicit module swaps, no class monkey-patching."""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Iterable
from typing import NamedTuple

from torch import Tensor, nn

from ..distributed import check_not_wrapped, check_writable
from ._base import AdapterModule, finite, positive_int, strict_bool
from .lora_embedding import LoRAEmbedding
from .lora_linear import LoRAConv1D, LoRALayerBase, LoRALinear, conv1d_type
from .multi_lora_linear import MultiLoRALinear
from .nf4 import LoRALinearNF4, is_4bit_linear


class ParamCount(NamedTuple):
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {100 * self.fraction:.4f}"


def _module(fn: str, model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model: expected an nn.Module, got {type(model).__name__}")


def _matches(name: str, target: str | Iterable[str]) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


LORA_LAYER_TYPES: tuple[type[LoRALayerBase], ...] = (LoRALinear, LoRAConv1D, LoRAEmbedding)
"""The LoRA layer classes :func:`apply_lora` builds (one adapter per layer)."""

_BIAS_MODES = ("none", "all", "lora_only")
# Where apply_lora records, on the model itself, what later apply_lora /
# mark_only_adapters_trainable calls keep trainable besides the adapters.
_SAVE_ATTR = "_peftops_modules_to_save"
_BIAS_ATTR = "_peftops_lora_bias"
#: Set by :func:`peftops.apply_bitfit`: the model's biases are adapters from then on.
BITFIT_ATTR = "_peftops_bitfit"
# peft's names for a sequence classifier's head (peft.utils.constants.SEQ_CLS_HEAD_NAMES).
_SEQ_CLS_HEAD_NAMES = ("score", "classifier")


def modules_to_save(model: nn.Module) -> tuple[str, ...]:
    """Full names of the modules :func:`apply_lora` (``modules_to_save=...``) keeps fully trainable."""
    _module("modules_to_save", model)
    return tuple(getattr(model, _SAVE_ATTR, ()))


def lora_bias(model: nn.Module) -> str:
    """The ``bias`` mode :func:`apply_lora` recorded on ``model``: ``"none"``, ``"all"`` or ``"lora_only"``."""
    _module("lora_bias", model)
    return getattr(model, _BIAS_ATTR, "none")


def _supported_types() -> str:
    return "nn.Linear, nn.Embedding, transformers' Conv1D or a 4-bit linear (LinearNF4, bitsandbytes' Linear4bit)"


def _wrap(
    name: str, module: nn.Module, r: int, alpha: float, dropout: float, use_rslora: bool, use_dora: bool = False
) -> LoRALayerBase:
    conv1d = conv1d_type()
    if is_4bit_linear(module):  # (bitsandbytes' Linear4bit subclasses nn.Linear: test it first)
        return LoRALinearNF4.from_quantized(
            module, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora
        )
    if type(module) is nn.Linear:
        return LoRALinear.from_linear(
            module, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora
        )
    if conv1d is not None and type(module) is conv1d:
        return LoRAConv1D.from_conv1d(
            module, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora
        )
    if type(module) is nn.Embedding and use_dora:
        raise ValueError(
            f"apply_lora: use_dora: {name!r} is an nn.Embedding, and peftops has DoRA for nn.Linear and "
            "transformers' Conv1D only; expected use_dora=False or target_modules without embeddings"
        )
    if type(module) is nn.Embedding:
        return LoRAEmbedding.from_embedding(module, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
    # Exact types only: a subclass may override forward (quantized layers, scaled embeddings).
    raise TypeError(
        f"apply_lora: target_modules: {name!r} expected an {_supported_types()}, got {type(module).__name__}"
    )


def _pattern_key(patterns: dict, name: str) -> str | None:
    """The first key of ``patterns`` that matches ``name`` as peft's ``get_pattern_key`` does:
    the key as a regex matching the whole name or its last dotted components."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", name)), None)


def _check_pattern(name: str, pattern: object, check_value) -> dict:
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise TypeError(f"apply_lora: {name}: expected a dict of module name patterns, got {type(pattern).__name__}")
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"apply_lora: {name}: expected non-empty str keys, got {key!r}")
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"apply_lora: {name}: key {key!r}: expected a regex, got an invalid one ({e})") from None
        check_value("apply_lora", f"{name}[{key!r}]", value)
    return dict(pattern)


def _str_list(name: str, value: object, allow_regex: bool) -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        if allow_regex:
            return value
    elif isinstance(value, Iterable):
        value = list(value)
        if all(isinstance(v, str) for v in value):
            return value
    kind = "a regex str or a list of str" if allow_regex else "a list of str"
    raise TypeError(f"apply_lora: {name}: expected {kind}, got {value!r}")


def _all_linear(model: nn.Module) -> list[str]:
    """The names peft's ``target_modules="all-linear"`` selects: every ``nn.Linear`` and
    ``Conv1D`` but the output head (``get_output_embeddings()``, or for a sequence classifier
    its ``score`` / ``classifier``), and nothing inside an adapter module."""
    conv1d = conv1d_type()
    linear_types = (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)
    names = {name for name, m in model.named_modules() if isinstance(m, linear_types) or is_4bit_linear(m)}
    excluded: set[str] = set()
    modeling = sys.modules.get("transformers.modeling_utils")
    if modeling is not None and isinstance(model, modeling.PreTrainedModel):
        head = model.get_output_embeddings()
        if head is None and type(model).__name__.endswith("ForSequenceClassification"):
            # peft does this for task_type SEQ_CLS; peftops reads the task off the class.
            head = next((getattr(model, n) for n in _SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None)
        if head is not None:
            excluded.update(name for name, m in model.named_modules() if m is head)
    for prefix, module in model.named_modules():
        if isinstance(module, AdapterModule):
            excluded.update(
                f"{prefix}.{suffix}" if prefix else suffix for suffix, _ in module.named_modules() if suffix
            )
    return sorted(names - excluded)


def apply_lora(
    model: nn.Module,
    target_modules: str | Iterable[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    *,
    use_rslora: bool = False,
    use_dora: bool = False,
    capacity: int | None = None,
    modules_to_save: Iterable[str] | None = None,
    bias: str = "none",
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    exclude_modules: str | Iterable[str] | None = None,
) -> nn.Module:
    """Replace matching layers by LoRA layers in place, freeze every other parameter, and
    return ``model``: ``nn.Linear`` by :class:`LoRALinear`, transformers' ``Conv1D`` by
    :class:`LoRAConv1D`, ``nn.Embedding`` by :class:`LoRAEmbedding` (exact types: anything
    else matched is a ``TypeError``). The base Parameters are shared, not copied, so the
    model's state dict keys are unchanged.

    With ``capacity``, ``nn.Linear`` children become :class:`MultiLoRALinear` layers with
    ``capacity`` adapter slots of rank up to ``r`` and no adapter yet: add adapters to every
    such layer with :func:`add_adapter` (``alpha`` and ``use_rslora`` are then given there,
    per adapter).

    The options follow HF PEFT's ``LoraConfig``:

    * ``target_modules``: a regex matched against the full module name, names matched exactly
      or as the last dotted components (``"q_proj"`` matches ``layers.0.attn.q_proj``), or
      ``"all-linear"``: every ``nn.Linear``/``Conv1D`` but the output head, as peft picks them.
    * ``exclude_modules``: a regex or names, matched the same way; never targeted.
    * ``modules_to_save``: names matched as peft does (a module whose full name ends with
      one): these modules train fully, in place (no wrapper: their state dict keys are
      unchanged) and are never LoRA targets, nor is anything inside them.
    * ``use_dora``: DoRA layers (:class:`LoRALinear` with ``use_dora=True``: a trained
      magnitude per output row, ``lora_magnitude_vector``), for ``nn.Linear`` and ``Conv1D``
      targets.
    * ``bias``: ``"none"``, ``"all"`` (every bias of the model trains) or ``"lora_only"`` (the
      biases of the LoRA layers).
    * ``rank_pattern`` / ``alpha_pattern``: ``{pattern: r}`` / ``{pattern: alpha}`` overriding
      ``r`` / ``alpha`` for the targets whose name the pattern matches (as a regex, whole or
      last dotted components; the first matching key wins, as peft's ``get_pattern_key``).

    ``modules_to_save`` and ``bias`` are recorded on the model (:func:`modules_to_save`,
    :func:`lora_bias`), so that later ``apply_lora`` and :func:`mark_only_adapters_trainable`
    calls keep them trainable; a second call adds its ``modules_to_save`` to the first's.

    A target whose weight other modules of ``model`` also hold (a tied ``lm_head``/embedding,
    a layer also reachable under a name not targeted) is wrapped, and trains as usual; the
    tie is recorded, so that :meth:`LoRALinear.merge` refuses to write the update through it.

    Call it before wrapping the model for data parallelism: a model that is a
    ``DistributedDataParallel`` or holds ``fully_shard``'ed modules is a ``ValueError`` (new
    adapters would be outside their gradient reduction).
    """
    _module("apply_lora", model)
    check_not_wrapped("apply_lora", model)
    if isinstance(target_modules, str):
        all_linear = target_modules.lower() == "all-linear"
    else:
        if not isinstance(target_modules, Iterable):
            raise TypeError(
                f"apply_lora: target_modules: expected a regex str or a non-empty list of str, got {type(target_modules).__name__}"
            )
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise TypeError(
                f"apply_lora: target_modules: expected a regex str or a non-empty list of str, got {target_modules!r}"
            )
        all_linear = False
    use_dora = strict_bool("apply_lora", "use_dora", use_dora)
    if not isinstance(bias, str) or bias not in _BIAS_MODES:
        raise ValueError(f"apply_lora: bias: expected one of {', '.join(map(repr, _BIAS_MODES))}, got {bias!r}")
    previous_bias = lora_bias(model)
    if bias != "none" and previous_bias not in ("none", bias):
        raise ValueError(
            f"apply_lora: bias: the model already trains biases as {previous_bias!r} (one mode per model, as "
            f"peft allows one adapter with a bias), got {bias!r}"
        )
    ranks = _check_pattern("rank_pattern", rank_pattern, positive_int)
    alphas = _check_pattern("alpha_pattern", alpha_pattern, finite)
    exclude = _str_list("exclude_modules", exclude_modules, allow_regex=True)
    to_save = _str_list("modules_to_save", modules_to_save, allow_regex=False) or []
    if capacity is not None:
        refused = [
            f"{n}={v!r}"
            for n, v in (
                ("bias", bias),
                ("use_dora", use_dora),
                ("modules_to_save", to_save),
                ("rank_pattern", ranks),
                ("alpha_pattern", alphas),
            )
            if v and v != "none"
        ]
        if refused:
            raise ValueError(
                f"apply_lora: capacity: MultiLoRALinear banks share the base layers between adapters and take r and "
                f"alpha per adapter (add_adapter), so expected no {', '.join(refused)}"
            )

    # remove_duplicate=False: a module registered under two names (tied) is swapped under both.
    all_modules = list(model.named_modules(remove_duplicate=False))
    saved = [name for name, _ in all_modules if name and any(name.endswith(m) for m in to_save)]
    if to_save and not saved:
        raise ValueError(
            f"apply_lora: modules_to_save: expected to match at least one module, got no match for {to_save!r}"
        )
    targets = _all_linear(model) if all_linear else target_modules
    lora_types = (*LORA_LAYER_TYPES, MultiLoRALinear)
    inside_lora = {name + ".": type(m).__name__ for name, m in all_modules if isinstance(m, lora_types)}
    matched, excluded = [], []
    for name, m in all_modules:
        if not name or not _matches(name, targets):
            continue
        # peft: excluded, and modules_to_save (with everything inside them), are never targets.
        if (exclude is not None and _matches(name, exclude)) or any(
            re.match(rf"(^|.*\.){key}($|\..*)", name) for key in to_save
        ):
            excluded.append(name)
        else:
            matched.append((name, m))
    if not matched:
        if excluded:
            raise ValueError(
                f"apply_lora: target_modules: expected a module that exclude_modules and modules_to_save leave, "
                f"got every match excluded ({', '.join(excluded[:6])}{', ...' if len(excluded) > 6 else ''})"
            )
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"apply_lora: target_modules: expected to match at least one module, got no match for {target_modules!r} "
            f"(nn.Linear modules: {', '.join(linears[:12]) or 'none'}{', ...' if len(linears) > 12 else ''})"
        )
    for name, module in matched:
        if isinstance(module, lora_types):
            raise ValueError(f"apply_lora: target_modules: {name!r} already is a {type(module).__name__}")
        owner = next((kind for prefix, kind in inside_lora.items() if name.startswith(prefix)), None)
        if owner is not None:
            raise ValueError(f"apply_lora: target_modules: {name!r} is part of a {owner}, not a base layer")
        if capacity is not None and type(module) is not nn.Linear:
            raise TypeError(
                f"apply_lora: target_modules: {name!r} expected an nn.Linear (MultiLoRALinear banks, capacity=...), "
                f"got {type(module).__name__}"
            )
    # Every layer is built before any is swapped in: a bad r or pattern value swaps nothing.
    wrapped: dict[int, nn.Module] = {}
    for name, module in matched:
        if id(module) in wrapped:
            continue
        if capacity is not None:
            wrapped[id(module)] = MultiLoRALinear.from_linear(module, capacity=capacity, r_max=r, dropout=dropout)
            continue
        r_key, alpha_key = _pattern_key(ranks, name), _pattern_key(alphas, name)
        layer_r = ranks[r_key] if r_key is not None else r
        layer_alpha = alphas[alpha_key] if alpha_key is not None else alpha
        wrapped[id(module)] = _wrap(name, module, layer_r, layer_alpha, dropout, use_rslora, use_dora)
    for pattern_name, pattern in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        unused = [k for k in pattern if not any(_pattern_key({k: None}, name) for name, _ in matched)]
        if unused:
            # A warning, as peft: a checkpoint's config may name modules this model lacks.
            warnings.warn(f"apply_lora: {pattern_name}: keys {unused!r} match no targeted module", stacklevel=2)
    for name, module in matched:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, wrapped[id(module)])
    for _, layer, ties in _lora_layers(model):
        layer._ties = tuple(ties)
    recorded = list(getattr(model, _SAVE_ATTR, ()))
    setattr(model, _SAVE_ATTR, (*recorded, *(n for n in saved if n not in recorded)))
    if bias != "none":
        setattr(model, _BIAS_ATTR, bias)
    mark_only_adapters_trainable(model)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer (:data:`LORA_LAYER_TYPES`) of ``model`` not merged yet
    (:meth:`LoRALinear.merge`) and return ``model``.

    Refuses, merging none, when a layer's weight is also held by another module of ``model``
    (a tied ``lm_head``/embedding, a layer also reachable under a name that was not
    targeted): writing the update into a shared Parameter would change those modules too.
    Ties are looked up now, so ties made after :func:`apply_lora` (``tie_weights``) count.
    Likewise refuses, merging none, while FSDP2 holds any layer's parameters unsharded
    (:func:`peftops.distributed.check_writable`): checked for every layer before the first write,
    so a refusal never leaves the model half merged.
    """
    layers = _lora_layers(model, "merge_adapters")
    for _, layer, _ in layers:
        if not layer.merged:
            check_writable("merge_adapters", layer)
    tied = [
        f"'{name + '.' if name else ''}weight' is also {', '.join(repr(t) for t, _, _ in ties)}"
        for name, _, ties in layers
        if ties
    ]
    for _, layer, ties in layers:
        layer._ties = tuple(ties)
    if tied:
        raise ValueError(
            f"merge_adapters: model: expected LoRA layer weights that no other module holds, got tied weights "
            f"({'; '.join(tied)}): merging would write the update into those modules too. Untie them (give the "
            "LoRA layer its own copy of the weight) or keep the adapters unmerged"
        )
    for _, layer, _ in layers:
        if not layer.merged:
            layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Unmerge every merged LoRA layer (:data:`LORA_LAYER_TYPES`) of ``model`` and return ``model``
    (refusing, unmerging none, as :func:`merge_adapters` does)."""
    layers = _lora_layers(model, "unmerge_adapters")
    for _, layer, _ in layers:
        if layer.merged:
            check_writable("unmerge_adapters", layer)
    for _, layer, _ in layers:
        if layer.merged:
            layer.unmerge()
    return model


def _lora_layers(model: nn.Module, owner: str | None = None) -> list[tuple[str, LoRALayerBase, list]]:
    """``(name, layer, ties)`` for each LoRA layer of ``model`` (once, under its first name);
    ``ties``: ``(name, module, attribute)`` of the other modules' parameters that are its weight."""
    if owner is not None:
        _module(owner, model)
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    layers: dict[int, tuple[str, LoRALayerBase]] = {}
    # remove_duplicate=False: a module or Parameter reachable under a second name is a tie.
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LORA_LAYER_TYPES):
            layers.setdefault(id(module), (mod_name, module))
        for attr, p in module.named_parameters(recurse=False, remove_duplicate=False):
            holders.setdefault(id(p), []).append((f"{mod_name}.{attr}" if mod_name else attr, module, attr))
    if owner is not None and not layers:
        raise ValueError(
            f"{owner}: model: expected LoRA layers ({', '.join(t.__name__ for t in LORA_LAYER_TYPES)}: apply_lora), got none"
        )
    out = []
    for name, layer in layers.values():
        # The same layer under two names is one layer, merged once: not a tie.
        ties = [h for h in holders.get(id(layer.weight), []) if h[1] is not layer]
        out.append((name, layer, ties))
    return out


def mark_only_adapters_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter, then unfreeze those of peftops adapter modules
    (``LoRALinear``'s A and B but not its base weight, adapters, prefixes, prompts), and what
    :func:`apply_lora` recorded on the model: its ``bias`` mode (:func:`lora_bias`) and its
    ``modules_to_save`` (:func:`modules_to_save`)."""
    _module("mark_only_adapters_trainable", model)
    if not any(isinstance(m, AdapterModule) for m in model.modules()):
        raise ValueError("mark_only_adapters_trainable: model: expected at least one peftops adapter module, got none")
    kept = {id(p) for p in adapter_trainable(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in kept)
    return model


def adapter_trainable(model: nn.Module) -> list[Tensor]:
    """The parameters :func:`mark_only_adapters_trainable` trains: those of peftops adapter
    modules, the ``bias`` mode's biases and the ``modules_to_save`` that :func:`apply_lora`
    recorded, and every bias after :func:`peftops.apply_bitfit` (empty for a plain model)."""
    kept: list[Tensor] = []
    for m in model.modules():
        if isinstance(m, AdapterModule):
            kept.extend(m.adapter_parameters())
    bias = lora_bias(model)
    if bias == "all" or getattr(model, BITFIT_ATTR, False):
        # peft's rule: every parameter named "bias", wherever it is.
        kept.extend(p for name, p in model.named_parameters() if name == "bias" or name.endswith(".bias"))
    elif bias == "lora_only":
        for layer in model.modules():
            layer_bias = getattr(layer, "bias", None) if isinstance(layer, LORA_LAYER_TYPES) else None
            if layer_bias is not None:
                kept.append(layer_bias)
    for name in modules_to_save(model):
        kept.extend(model.get_submodule(name).parameters())
    return kept


def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter of ``model`` that is not :func:`adapter_trainable`'s, and leave
    those as they are: what an ``apply_*`` does to the base before adding its own trainable
    parameters, so that adapters an earlier ``apply_*`` added keep training, and adapters the
    user froze stay frozen."""
    kept = {id(p) for p in adapter_trainable(model)}
    for p in model.parameters():
        if id(p) not in kept:
            p.requires_grad_(False)


def count_trainable(model: nn.Module) -> ParamCount:
    """``(trainable, total)`` parameter counts; shared parameters count once."""
    _module("count_trainable", model)
    seen = {id(p): p for p in model.parameters()}
    return ParamCount(
        trainable=sum(p.numel() for p in seen.values() if p.requires_grad),
        total=sum(p.numel() for p in seen.values()),
    )


def add_adapter(model: nn.Module, name: str, r: int, alpha: float, *, use_rslora: bool = False) -> nn.Module:
    """Add adapter ``name`` to every :class:`MultiLoRALinear` of ``model`` (all get the same slot
    index, since they fill their slots in the same order) and return ``model``."""
    layers = _multi_layers("add_adapter", model)
    slots = {layer.add_adapter(name, r, alpha, use_rslora=use_rslora) for layer in layers}
    if len(slots) != 1:
        raise RuntimeError(
            f"add_adapter: the layers put {name!r} in different slots {sorted(slots)}: "
            "add and remove adapters through the model, not layer by layer"
        )
    return model


def remove_adapter(model: nn.Module, name: str) -> nn.Module:
    for layer in _multi_layers("remove_adapter", model):
        layer.remove_adapter(name)
    return model


def set_batch_adapters(model: nn.Module, ids) -> nn.Module:
    """Every :class:`MultiLoRALinear` of ``model`` uses ``ids`` (names, slots, None, or a tensor)
    for the following batches' rows."""
    for layer in _multi_layers("set_batch_adapters", model):
        layer.set_batch_adapters(ids)
    return model


def _multi_layers(owner: str, model: nn.Module) -> list:
    _module(owner, model)
    layers = list({id(m): m for m in model.modules() if isinstance(m, MultiLoRALinear)}.values())
    if not layers:
        raise ValueError(f"{owner}: model: expected MultiLoRALinear layers (apply_lora(..., capacity=N)), got none")
    return layers

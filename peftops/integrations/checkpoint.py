"""PEFT-format adapter checkpoints for models built with peftops' own layers.

``save_adapter(model, dir)`` writes ``adapter_config.json`` and ``adapter_model.safetensors``
exactly as ``peft.PeftModel.save_pretrained`` lays them out, so
``peft.PeftModel.from_pretrained(base, dir)`` loads them; ``load_adapter(model, dir)`` reads
such a directory (written by peft or by peftops) into a plain transformers model, building the
peftops layers the config asks for; ``merge_and_unload(model)`` folds LoRA updates into the
base weights and puts the base layer types back, for ``save_pretrained`` / ``from_pretrained``.

Key layout (peft's, without the adapter name, which peft strips when it saves):

============================  ==================================================
peftops model                 peft checkpoint
============================  ==================================================
``<m>.lora_A.weight``         ``base_model.model.<m>.lora_A.weight``
``<m>.lora_B.weight``         ``base_model.model.<m>.lora_B.weight``
``<m>.lora_embedding_A``      ``base_model.model.<m>.lora_embedding_A``
``<m>.bias`` (LoRA layer)     ``base_model.model.<m>.base_layer.bias`` (``bias`` != "none")
``<n>.bias`` (other layers)   ``base_model.model.<n>.bias`` (``bias="all"``)
``<s>.<k>`` (modules_to_save) ``base_model.model.<s>.<k>``
============================  ==================================================

Quantised models (QLoRA) work the same way: a model whose linear layers are 4-bit, as
:func:`peftops.nn.quantize_model` makes them (``LinearNF4``) or as transformers + bitsandbytes
loads them (``BitsAndBytesConfig(load_in_4bit=True)``: bitsandbytes' ``Linear4bit``), gets
``LoRALinearNF4`` layers over the packed weights from ``load_adapter`` (nothing dequantised or
copied), and its LoRA keys are those of a float model, so peft's QLoRA adapters load here and
adapters saved here load with peft onto the bitsandbytes model.

Every config field is either honoured or, when it asks for something peftops does not do
(DoRA, ``layers_to_transform``, LoftQ/PiSSA initialisation, ...), refused with a
``ValueError`` naming it: a checkpoint is never loaded with part of its meaning dropped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..distributed import is_sharded
from ..nn import surgery
from ..nn.multi_lora_linear import MultiLoRALinear
from .peft_format import METADATA_FIELDS, PREFIX, is_off, target_modules_for

__all__ = ["load_adapter", "merge_and_unload", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"

# LoraConfig fields this module reads (everything else must hold its "off" value).
_LORA_FIELDS = {
    "r",
    "use_dora",
    "lora_alpha",
    "target_modules",
    "exclude_modules",
    "lora_dropout",
    "bias",
    "use_rslora",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    # peft itself decides per layer: Conv1D layers always run fan-in-fan-out, nn.Linear never.
    "fan_in_fan_out",
    "init_lora_weights",
}
# Metadata, and LoraConfig fields only read when another field (refused unless off) asks for them:
# megatron_core with megatron_config, qalora_group_size with use_qalora.
_METADATA_FIELDS = METADATA_FIELDS | {"runtime_config", "megatron_core", "qalora_group_size"}
# Initialisations that only choose the starting A and B: a checkpoint overwrites them. The others
# (PiSSA, OLoRA, LoftQ, CorDA, EVA, ...) also rewrite the base weights, which this load would not do.
_PLAIN_INITS = (True, False, "gaussian")

_TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
)


def _check_model(owner: str, model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model: expected an nn.Module, got {type(model).__name__}")
    return model


def _lora_types() -> tuple[type[Any], ...]:
    return surgery.LORA_LAYER_TYPES


def _lora_layers(model: nn.Module) -> dict[str, Any]:
    """Each LoRA layer once, under its first name (a tied layer reachable twice is one layer)."""
    types = _lora_types()
    seen: dict[int, str] = {}
    out: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, types) and id(module) not in seen:
            seen[id(module)] = name
            out[name] = module
    return out


def _is_embedding(layer: nn.Module) -> bool:
    return hasattr(layer, "lora_embedding_A")


def _adapter_kinds(model: nn.Module) -> dict[str, list[str]]:
    """Adapter method -> the module names holding one, for every method peftops can have in a model."""
    from ..nn import BottleneckAdapter, IA3Linear, PrefixKV, PromptEmbedding

    kinds: dict[str, list[str]] = {}
    lora = _lora_types()
    for name, module in model.named_modules():
        if isinstance(module, lora):
            kinds.setdefault("lora", []).append(name)
        elif isinstance(module, MultiLoRALinear):
            kinds.setdefault("multi_lora", []).append(name)
        elif isinstance(module, IA3Linear):
            kinds.setdefault("ia3", []).append(name)
        elif isinstance(module, PrefixKV):
            kinds.setdefault("prefix", []).append(name)
        elif isinstance(module, PromptEmbedding) or type(module).__name__ == "PromptEncoder":
            kinds.setdefault("prompt", []).append(name)
        elif isinstance(module, BottleneckAdapter):
            kinds.setdefault("bottleneck", []).append(name)
    return kinds


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES if cls.endswith(suffix)), None)


def _name_or_path(model: nn.Module) -> str | None:
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name or None


# -- save ----------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Write ``model``'s adapter as a PEFT checkpoint: ``adapter_config.json`` and
    ``adapter_model.safetensors`` in ``save_directory`` (created if needed).

    ``peft.PeftModel.from_pretrained(base, save_directory)`` then computes what ``model`` does.
    LoRA layers (``apply_lora``: ``LoRALinear``, ``LoRAConv1D``, ``LoRAEmbedding``, with their
    ``bias`` mode and ``modules_to_save``) and multi-adapter banks (``MultiLoRALinear``: the
    adapter ``adapter_name`` of the bank) save as peft's ``LORA``; prefix tuning and prompt
    tuning as peft's ``PREFIX_TUNING`` / ``PROMPT_TUNING`` / ``P_TUNING``. A model holding several
    methods at once, or one peft cannot express (bottleneck adapters), is refused.

    Single-adapter models have one unnamed adapter: ``adapter_name`` must then be "default".

    From a distributed job (``torch.distributed``) it is collective: every rank calls it with
    its part of the model (FSDP2-sharded by ``fully_shard``, or wrapped in
    ``DistributedDataParallel``), the adapter tensors alone are gathered (never the frozen
    base) and rank 0 alone writes one checkpoint, the same bytes as a single process holding
    the same weights writes; no rank returns before the files are written. Adapters that are
    not sharded (DDP) need no gathering: there the other ranks return at once (``barrier()``
    before reading the files on them), and rank 0 may also call it alone.
    """
    owner = "save_adapter"
    _check_model(owner, model)
    from .distributed_checkpoint import reshard, unwrap

    model = reshard(unwrap(model))
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"{owner}: save_directory: expected a str or os.PathLike, got {type(save_directory).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise TypeError(f"{owner}: adapter_name: expected a non-empty str, got {adapter_name!r}")
    kinds = _adapter_kinds(model)
    if not kinds:
        raise ValueError(f"{owner}: model: expected peftops adapter layers (apply_lora, ...), got none")
    if len(kinds) > 1:
        found = "; ".join(f"{k}: {', '.join(v[:3])}{', ...' if len(v) > 3 else ''}" for k, v in kinds.items())
        raise ValueError(
            f"{owner}: model: expected one adapter method (a PEFT checkpoint holds one), got several ({found})"
        )
    (kind,) = kinds
    if kind == "bottleneck":
        raise ValueError(
            f"{owner}: model: bottleneck adapters ({', '.join(kinds[kind][:3])}) have no PEFT checkpoint format; "
            "save them with model.state_dict()"
        )
    if kind != "multi_lora" and adapter_name != "default":
        raise ValueError(
            f"{owner}: adapter_name: expected 'default' (this model holds one unnamed {kind} adapter; names "
            f"select an adapter of a MultiLoRALinear bank), got {adapter_name!r}"
        )
    if kind == "lora":
        config, tensors = _lora_state(model)
    elif kind == "multi_lora":
        config, tensors = _bank_state(model, adapter_name)
    elif kind == "ia3":
        from . import ia3

        config, tensors = ia3.peft_ia3_state(model)
    elif kind == "prefix":
        from . import prefix_tuning

        config, tensors = prefix_tuning.peft_prefix_state(model)
    else:
        from . import prompt_tuning

        config, tensors = prompt_tuning.peft_prompt_state(model)
    config.setdefault("task_type", _task_type(model))
    config.setdefault("base_model_name_or_path", _name_or_path(model))
    config.setdefault("inference_mode", True)
    # Every rank gathers the same sharded tensors in the same (the model's) order.
    sharded = any(is_sharded(t) for t in tensors.values())
    tensors = {k: _full(v) for k, v in tensors.items()}
    if not _distributed() or torch.distributed.get_rank() == 0:
        _write(save_directory, config, tensors)
    if sharded:
        # Every rank is here anyway: none returns before rank 0 has written the files.
        torch.distributed.barrier()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _full(t: Tensor) -> Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank calls it), else ``t``."""
    return cast(Any, t).full_tensor() if is_sharded(t) else t


def _write(save_directory: str | os.PathLike, config: dict, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    os.makedirs(save_directory, exist_ok=True)
    # safetensors refuses tensors that share storage (tied weights, views): one copy each.
    flat = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}
    save_file(flat, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def _pattern_key(path: str, names: Iterable[str]) -> str:
    """``path`` as a peft pattern key (peft matches ``(.*\\.)?(key)$`` as a regex): the plain name
    when it matches no other module, else escaped."""
    hits = [n for n in names if re.match(rf"(.*\.)?({path})$", n)]
    return path if hits == [path] else re.escape(path)


def _most_common(values: list) -> Any:
    return max(sorted(set(values), key=values.index), key=values.count)


def _lora_state(model: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    layers = _lora_layers(model)
    all_names = [n for n, _ in model.named_modules()]
    ranks = {n: layer.r for n, layer in layers.items()}
    alphas = {n: layer.lora_alpha for n, layer in layers.items()}
    r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    rslora = {layer.use_rslora for layer in layers.values()}
    dora = {bool(getattr(layer, "use_dora", False)) for layer in layers.values()}
    dropout = {layer.lora_dropout for layer in layers.values() if not _is_embedding(layer)} or {0.0}
    for field, values in (("use_rslora", rslora), ("use_dora", dora), ("lora_dropout", dropout)):
        if len(values) > 1:
            raise ValueError(
                f"save_adapter: model: expected one {field} for every LoRA layer (peft's config has one), got {sorted(values)}"
            )
    bias = surgery.lora_bias(model)
    to_save = surgery.modules_to_save(model)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": target_modules_for(list(layers), all_names),
        "exclude_modules": None,
        "lora_dropout": dropout.pop(),
        "use_rslora": rslora.pop(),
        "bias": bias,
        "fan_in_fan_out": any(type(layer).__name__ == "LoRAConv1D" for layer in layers.values()),
        "modules_to_save": list(to_save) or None,
        "rank_pattern": {_pattern_key(n, all_names): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {_pattern_key(n, all_names): v for n, v in alphas.items() if v != alpha},
        "init_lora_weights": True,
        "use_dora": dora.pop(),
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        if _is_embedding(layer):
            tensors[f"{PREFIX}{name}.lora_embedding_A"] = layer.lora_embedding_A
            tensors[f"{PREFIX}{name}.lora_embedding_B"] = layer.lora_embedding_B
        else:
            tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
            tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
        if getattr(layer, "use_dora", False):
            # peft's key: the magnitude vector (out,), no ".weight", no adapter name.
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    if bias != "none":
        owners = {f"{n}.": n for n in layers}
        for key, value in model.state_dict().items():
            # peft's own test for bias="all" (trainable and saved): "bias" anywhere in the name.
            if "bias" not in key:
                continue
            layer_name = key[: -len(".bias")] if key.endswith(".bias") else None
            if layer_name is not None and layer_name + "." in owners:
                tensors[f"{PREFIX}{layer_name}.base_layer.bias"] = value
            elif bias == "all":
                tensors[PREFIX + key] = value
    for module_name in to_save:
        for key, value in model.get_submodule(module_name).state_dict().items():
            tensors[f"{PREFIX}{module_name}.{key}"] = value
    return config, tensors


def _bank_state(model: nn.Module, adapter_name: str) -> tuple[dict, dict[str, Tensor]]:
    banks = {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}
    missing = [n for n, m in banks.items() if adapter_name not in m.adapters]
    if missing:
        names = sorted(next(iter(banks.values())).adapters)
        raise ValueError(f"save_adapter: adapter_name: expected one of {names}, got {adapter_name!r}")
    all_names = [n for n, _ in model.named_modules()]
    ranks, scales, tensors = {}, {}, {}
    for name, bank in banks.items():
        slot = bank.adapters[adapter_name]
        r = int(bank.ranks[slot])
        ranks[name], scales[name] = r, float(bank.scales[slot])
        # Under FSDP2 these are DTensor slices of the sharded bank, gathered whole by save_adapter.
        tensors[f"{PREFIX}{name}.lora_A.weight"] = bank.lora_A[slot, :r]
        tensors[f"{PREFIX}{name}.lora_B.weight"] = bank.lora_B[slot, :, :r]
    # A bank keeps each slot's scale, not its alpha: write alpha = scale * r (plain LoRA scaling),
    # which peft turns back into the same scale.
    alphas = {n: scales[n] * ranks[n] for n in banks}
    r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    dropout = {bank.lora_dropout for bank in banks.values()}
    if len(dropout) > 1:
        raise ValueError(f"save_adapter: model: expected one lora_dropout for every bank, got {sorted(dropout)}")
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": target_modules_for(list(banks), all_names),
        "lora_dropout": dropout.pop(),
        "use_rslora": False,
        "bias": "none",
        "modules_to_save": None,
        "rank_pattern": {_pattern_key(n, all_names): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {_pattern_key(n, all_names): v for n, v in alphas.items() if v != alpha},
        "init_lora_weights": True,
    }
    return config, tensors


def _pattern_value(pattern: dict, name: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first key (in the dict's order) that matches the end of
    ``name`` at a component boundary, as a regex."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# -- load ----------------------------------------------------------------------------------------


def _read(owner: str, path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{owner}: path: expected a str or os.PathLike, got {type(path).__name__}")
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise ValueError(f"{owner}: path: expected a PEFT adapter directory holding {CONFIG_NAME}, got {str(path)!r}")
    with open(config_file) as f:
        config = json.load(f)
    weights = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(weights):
        from safetensors.torch import load_file

        tensors = load_file(weights)
    elif os.path.isfile(os.path.join(path, LEGACY_WEIGHTS_NAME)):
        tensors = torch.load(os.path.join(path, LEGACY_WEIGHTS_NAME), map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{owner}: path: expected {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {str(path)!r}")
    return config, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Read the PEFT adapter directory ``path`` into ``model`` and return ``model``.

    ``model`` is the plain base model (a transformers model, or any module tree): for a
    ``LORA`` checkpoint the config's ``target_modules``, ``exclude_modules``, ``r``,
    ``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``, ``lora_dropout``,
    ``bias`` and ``modules_to_save`` are applied with :func:`peftops.apply_lora`, then the
    weights loaded; 4-bit linear layers (``LinearNF4``, bitsandbytes' ``Linear4bit``) become
    ``LoRALinearNF4`` over their packed weights. A model holding ``MultiLoRALinear`` banks (``apply_lora(..., capacity=N)``)
    gets the checkpoint as the bank adapter ``adapter_name`` instead, per-layer ranks included.
    ``PREFIX_TUNING``, ``PROMPT_TUNING`` and ``P_TUNING`` checkpoints go to the prefix and prompt
    tuning integrations.

    Raises ``ValueError`` naming the field for a config field peftops does not honour, a key of
    the file that lands nowhere, or a LoRA parameter the file does not provide.
    """
    owner = "load_adapter"
    _check_model(owner, model)
    if not isinstance(adapter_name, str) or not adapter_name:
        raise TypeError(f"{owner}: adapter_name: expected a non-empty str, got {adapter_name!r}")
    config, tensors = _read(owner, path)
    peft_type = config.get("peft_type")
    if peft_type == "PREFIX_TUNING":
        from . import prefix_tuning

        return prefix_tuning.load_peft_prefix(model, config, tensors, adapter_name)
    if peft_type in ("PROMPT_TUNING", "P_TUNING"):
        from . import prompt_tuning

        return prompt_tuning.load_peft_prompt(model, config, tensors, adapter_name)
    if peft_type == "IA3":
        from . import ia3

        return ia3.load_peft_ia3(model, config, tensors, adapter_name)
    if peft_type != "LORA":
        raise ValueError(
            f"{owner}: peft_type: expected one of LORA, IA3, PREFIX_TUNING, PROMPT_TUNING, P_TUNING, got {peft_type!r}"
        )
    _check_lora_config(owner, config)
    if any(isinstance(m, MultiLoRALinear) for m in model.modules()):
        return _load_into_banks(owner, model, config, tensors, adapter_name)
    if _lora_layers(model):
        raise ValueError(
            f"{owner}: model: expected the base model without LoRA layers (load_adapter applies the checkpoint's "
            f"config itself), got LoRA layers ({', '.join(list(_lora_layers(model))[:3])}, ...); to replace their "
            "weights use model.load_state_dict"
        )
    if adapter_name != "default":
        raise ValueError(
            f"{owner}: adapter_name: expected 'default' (a model without MultiLoRALinear banks holds one unnamed "
            f"adapter), got {adapter_name!r}"
        )
    surgery.apply_lora(
        model,
        config["target_modules"],
        r=config.get("r", 8),
        alpha=config.get("lora_alpha", 8),
        dropout=config.get("lora_dropout", 0.0),
        use_rslora=config.get("use_rslora", False),
        modules_to_save=config.get("modules_to_save") or None,
        bias=config.get("bias", "none"),
        rank_pattern=config.get("rank_pattern") or None,
        alpha_pattern=config.get("alpha_pattern") or None,
        exclude_modules=config.get("exclude_modules") or None,
        use_dora=bool(config.get("use_dora", False)),
    )
    layers = _lora_layers(model)
    state = _model_keys(owner, tensors, layers, surgery.modules_to_save(model))
    expected = {
        f"{n}.{p}"
        for n, layer in layers.items()
        for p in (
            ("lora_embedding_A", "lora_embedding_B") if _is_embedding(layer) else ("lora_A.weight", "lora_B.weight")
        )
        + (("lora_magnitude_vector",) if getattr(layer, "use_dora", False) else ())
    }
    missing_lora = sorted(expected - state.keys())
    if missing_lora:
        raise ValueError(
            f"{owner}: path: expected a tensor for every LoRA parameter the config creates, got none for "
            f"{', '.join(missing_lora[:6])}{', ...' if len(missing_lora) > 6 else ''}"
        )
    params = dict(model.state_dict())
    unknown = sorted(k for k in state if k not in params)
    if unknown:
        raise ValueError(
            f"{owner}: path: expected every tensor to name a parameter of the model, got "
            f"{', '.join(PREFIX + k for k in unknown[:6])}{', ...' if len(unknown) > 6 else ''}"
        )
    wrong = [
        f"{k}: {tuple(v.shape)} vs the model's {tuple(params[k].shape)}"
        for k, v in state.items()
        if v.shape != params[k].shape
    ]
    if wrong:
        raise ValueError(
            f"{owner}: path: expected tensors shaped as the model's parameters, got {'; '.join(wrong[:4])}"
        )
    model.load_state_dict(state, strict=False)
    return model


def _check_lora_config(owner: str, config: dict) -> None:
    refused = []
    for key, value in config.items():
        if key in _LORA_FIELDS or key in _METADATA_FIELDS:
            continue
        if not is_off(value):
            refused.append(f"{key}={value!r}")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        refused.append(f"init_lora_weights={init!r} (it rewrites the base weights)")
    if refused:
        raise ValueError(
            f"{owner}: adapter_config.json: peftops does not support {', '.join(refused)}; expected these fields "
            "unset (peftops loads plain LoRA, rsLoRA, rank/alpha patterns, bias modes and modules_to_save)"
        )
    if config.get("target_modules") in (None, [], ""):
        raise ValueError(
            f"{owner}: target_modules: expected the modules the adapter targets, got {config.get('target_modules')!r}"
        )


def _model_keys(
    owner: str, tensors: dict[str, Tensor], layers: dict[str, Any], to_save: tuple[str, ...]
) -> dict[str, Tensor]:
    """peft checkpoint keys -> this model's state-dict keys.

    peft wraps a LoRA layer's base as ``<m>.base_layer`` (its bias with ``bias`` != "none", and
    an embedding's whole weight when embeddings are targeted) and a ``modules_to_save`` module
    ``<s>`` as ``<s>.modules_to_save`` (the trained copy) next to ``<s>.original_module`` (the
    frozen base copy). peftops keeps both in place, so ``<m>.base_layer.x`` is ``<m>.x``,
    ``<s>.modules_to_save.x`` is ``<s>.x``, and the base copy, which ``bias="all"`` makes peft
    save too, is the base model's own value and is not loaded.
    """
    out = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{owner}: path: expected tensor names starting with {PREFIX!r}, got {key!r}")
        k = key[len(PREFIX) :]
        owner_layer = next((m for m in layers if k.startswith(m + ".base_layer.")), None)
        owner_saved = next((s for s in to_save if k.startswith(s + ".")), None)
        if owner_layer is not None:
            k = owner_layer + k[len(owner_layer) + len(".base_layer") :]
        elif owner_saved is not None and k.startswith(owner_saved + ".original_module."):
            continue
        elif owner_saved is not None and k.startswith(owner_saved + ".modules_to_save."):
            k = owner_saved + k[len(owner_saved) + len(".modules_to_save") :]
        elif ".base_layer." in k:
            raise ValueError(
                f"{owner}: path: {key!r} is under base_layer, but {k.partition('.base_layer.')[0]!r} is not a LoRA layer"
            )
        out[k] = value
    return out


def _load_into_banks(
    owner: str, model: nn.Module, config: dict, tensors: dict[str, Tensor], adapter_name: str
) -> nn.Module:
    banks = {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}
    for field in ("modules_to_save",):
        if not is_off(config.get(field)):
            raise ValueError(f"{owner}: {field}: a MultiLoRALinear bank holds LoRA weights only, got {config[field]!r}")
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"{owner}: bias: a MultiLoRALinear bank shares the base bias between adapters, got {config['bias']!r}"
        )
    if config.get("use_dora", False):
        raise ValueError(f"{owner}: use_dora: a MultiLoRALinear bank holds plain LoRA adapters, got True")
    weights: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        k = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        for suffix in (".lora_A.weight", ".lora_B.weight"):
            if k.endswith(suffix):
                weights.setdefault(k[: -len(suffix)], {})[suffix[1:7]] = value
                break
        else:
            raise ValueError(
                f"{owner}: path: expected only lora_A/lora_B weights for a MultiLoRALinear bank, got {key!r}"
            )
    outside = sorted(set(weights) - set(banks))
    if outside:
        raise ValueError(
            f"{owner}: path: the adapter targets {', '.join(outside[:4])}, which are not MultiLoRALinear layers of the "
            f"model (its banks: {', '.join(list(banks)[:4])}, ...)"
        )
    dropout = float(config.get("lora_dropout", 0.0))
    if model.training and any(bank.lora_dropout != dropout for bank in banks.values()):
        raise ValueError(
            f"{owner}: lora_dropout: a bank applies its own dropout ({sorted({b.lora_dropout for b in banks.values()})}) "
            f"to every adapter, got {dropout}; build the bank with dropout={dropout}, or load for inference (model.eval())"
        )
    r0, alpha0, rslora = config.get("r", 8), config.get("lora_alpha", 8), bool(config.get("use_rslora", False))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for name, bank in banks.items():
        if name in weights:
            pair = weights[name]
            if pair.keys() != {"lora_A", "lora_B"}:
                raise ValueError(f"{owner}: path: expected both lora_A and lora_B for {name!r}, got {sorted(pair)}")
            r = _pattern_value(rank_pattern, name, r0)
            alpha = _pattern_value(alpha_pattern, name, alpha0)
            if tuple(pair["lora_A"].shape) != (r, bank.in_features) or tuple(pair["lora_B"].shape) != (
                bank.out_features,
                r,
            ):
                raise ValueError(
                    f"{owner}: path: {name}: expected lora_A {(r, bank.in_features)} and lora_B "
                    f"{(bank.out_features, r)}, got {tuple(pair['lora_A'].shape)} and {tuple(pair['lora_B'].shape)}"
                )
            slot = bank.add_adapter(adapter_name, r, alpha, use_rslora=rslora)
            with torch.no_grad():
                bank.lora_A[slot, :r].copy_(pair["lora_A"])
                bank.lora_B[slot, :, :r].copy_(pair["lora_B"])
        else:
            # Slots line up across layers: a layer the adapter does not target gets a zero update.
            slot = bank.add_adapter(adapter_name, 1, 1.0)
            with torch.no_grad():
                bank.lora_A[slot].zero_()
                bank.lora_B[slot].zero_()
    return model


# -- merge and unload ----------------------------------------------------------------------------


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every LoRA update (and IA3 vector) into its base weight and put the base layers back
    (``nn.Linear``, transformers' ``Conv1D``, ``nn.Embedding``, holding the same Parameters), so
    ``model.save_pretrained`` writes the merged weights and ``from_pretrained`` of the stock
    class loads them. Returns ``model``.

    4-bit layers (``LoRALinearNF4``, QLoRA) are dequantised, merged and quantised again with the
    same format (NF4/FP4, block size, double quantisation), with a ``UserWarning`` as peft gives:
    the rounding changes the outputs, by about as much as quantising the float model did once.
    They become :class:`peftops.nn.LinearNF4`, also when the base was bitsandbytes'
    ``Linear4bit``: ``LinearNF4`` holds bitsandbytes' state-dict keys, so ``save_pretrained`` of a
    transformers model quantised by bitsandbytes writes the checkpoint ``from_pretrained`` loads
    back as ``Linear4bit``, and the merged model needs no bitsandbytes to run.

    Refuses, changing nothing, models whose adapters cannot be folded into weights (prefix or
    prompt tuning, bottleneck adapters, several adapters in ``MultiLoRALinear`` banks) and LoRA
    layers whose weight another module also holds (see :func:`peftops.merge_adapters`).
    """
    from ..nn import IA3Linear

    owner = "merge_and_unload"
    _check_model(owner, model)
    kinds = _adapter_kinds(model)
    others = {k: v for k, v in kinds.items() if k not in ("lora", "ia3")}
    if others:
        found = "; ".join(f"{k}: {', '.join(v[:3])}" for k, v in others.items())
        raise ValueError(
            f"{owner}: model: expected LoRA or IA3 layers only (other adapters cannot be folded into the base "
            f"weights), got {found}"
        )
    if not kinds:
        raise ValueError(f"{owner}: model: expected LoRA or IA3 layers (apply_lora, apply_ia3), got none")
    if "lora" in kinds:
        surgery.merge_adapters(model)
    for ia3 in {id(m): m for m in model.modules() if isinstance(m, IA3Linear)}.values():
        if not ia3.merged:
            ia3.merge()
    replaced: dict[int, nn.Module] = {}
    for name, layer in list(model.named_modules(remove_duplicate=False)):
        if isinstance(layer, (*_lora_types(), IA3Linear)):
            base = replaced.setdefault(id(layer), cast(Any, layer).unwrap())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, base)
    return model

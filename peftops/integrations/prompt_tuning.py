"""Prompt tuning and P-tuning on transformers models, as peft's ``PromptTuningConfig`` /
``PromptEncoderConfig`` compute them, with no change to the user's call.

:func:`apply_prompt_tuning` keeps the learned prompt as a submodule of the model
(``model.peftops_prompt``: a :class:`peftops.nn.PromptEmbedding`, or a :class:`PromptEncoder`
for P-tuning) and registers a forward pre-hook that does what ``peft.PeftModelForCausalLM`` /
``PeftModelForSequenceClassification`` do around the base model:

* the prompt's embeddings go in front of the input embeddings (``input_ids`` are embedded with
  the model's own input embeddings, or ``inputs_embeds`` are used as given);
* ``attention_mask`` gets ``num_virtual_tokens`` ones in front; causal-LM ``labels`` get as
  many ``-100``; sequence-classification ``token_type_ids`` get zeros in front;
* ``position_ids`` are dropped with a warning (the model numbers the positions itself, the
  virtual tokens first), and so are a causal LM's ``token_type_ids``, as peft does;
* a call whose KV cache already holds tokens (a decoding step of ``generate()``, or the user's
  own incremental decoding) gets no prompt again, since the cache holds it, only the mask
  entries for it. ``cache_position`` is dropped, so the model counts from the cache, which
  holds the virtual tokens too.

With ``capacity=N`` the prompt is a bank of up to ``N`` prompts
(:class:`peftops.nn.MultiPromptEmbedding`): :func:`add_prompt` / :func:`remove_prompt` fill and
free slots, :func:`set_prompt_ids` names each row's prompt, and each row gets its own prompt in
one batch; a causal LM's row without a prompt gets its virtual positions masked out and its
positions numbered from its first real token, so it computes what the base model does.

The hook fires in ``model(...)`` (``__call__``), which is what ``generate()`` calls; calling
``model.forward`` directly bypasses it. Attention masks must be 2-D ``(B, L)``.

``peft_prompt_state`` / ``load_peft_prompt`` convert to and from peft's checkpoint format
(``prompt_embeddings``: the prompt itself, ``(num_virtual_tokens, token_dim)``; for P-tuning,
what the encoder produces, so a loaded P-tuning checkpoint is a fixed prompt, as in peft's
inference mode), for :func:`peftops.save_adapter` / :func:`peftops.load_adapter`. A sequence
classification model's head (``classifier`` / ``score``) is saved with the prompt, as peft's
``modules_to_save`` does: it is usually freshly initialised, so a reloaded model would
otherwise get another one.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..distributed import check_not_wrapped
from ..nn import PromptEmbedding
from ..nn._base import AdapterModule, positive_int
from ..nn.multi_prompt import MultiPromptEmbedding
from ..nn.surgery import freeze_base, modules_to_save
from .hf_call import cached_length, call_kwargs
from .peft_format import METADATA_FIELDS

__all__ = [
    "PromptEncoder",
    "add_prompt",
    "apply_prompt_tuning",
    "load_peft_prompt",
    "peft_prompt_state",
    "remove_prompt",
    "remove_prompt_tuning",
    "set_prompt_ids",
]

ATTR = "peftops_prompt"
_STATE = "_peftops_prompt_tuning"
PREFIX = "base_model."  # prompt learning: peft's base_model is the transformers model itself
_HEAD_NAMES = ("classifier", "score")  # what peft's PeftModelForSequenceClassification saves

_COMMON_FIELDS = METADATA_FIELDS | {
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    # Shape metadata of the base model: prompt tuning reads neither.
    "num_attention_heads",
    "num_layers",
    "modules_to_save",
}
# Initialisation only: a checkpoint's prompt_embeddings replace whatever they would build.
_PROMPT_TUNING_FIELDS = {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"}
# peft saves what the encoder produces, never the encoder, so these only describe the training.
_P_TUNING_FIELDS = {"encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"}
_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


class PromptEncoder(AdapterModule):
    r"""P-tuning's prompt encoder (Liu et al. 2021), peft's ``PromptEncoder`` math and parameter names.

    ``embedding`` ``(num_virtual_tokens, token_dim)`` goes through ``mlp_head``
    (``Linear-ReLU-Linear-ReLU-Linear``, hidden ``hidden_size``) for ``encoder_type="MLP"``, or
    through a bidirectional ``lstm_head`` then ``mlp_head`` (``Linear-ReLU-Linear`` on
    ``2 * hidden_size``) for ``"LSTM"``. ``heads=False`` builds the embedding alone, which is
    then the prompt: what a P-tuning checkpoint holds (peft saves the encoder's output).

    ``forward() -> (num_virtual_tokens, token_dim)``: the prompt.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        token_dim: int,
        hidden_size: int,
        encoder_type: str = "MLP",
        num_layers: int = 2,
        dropout: float = 0.0,
        *,
        heads: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = "PromptEncoder"
        self.total_virtual_tokens = positive_int(owner, "num_virtual_tokens", num_virtual_tokens)
        self.token_dim = self.input_size = self.output_size = positive_int(owner, "token_dim", token_dim)
        self.hidden_size = positive_int(owner, "hidden_size", hidden_size)
        if encoder_type not in ("MLP", "LSTM"):
            raise ValueError(f"{owner}: encoder_type: expected 'MLP' or 'LSTM', got {encoder_type!r}")
        self.encoder_type = encoder_type
        self.num_layers = positive_int(owner, "num_layers", num_layers)
        self.dropout = float(dropout)
        factory = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(self.total_virtual_tokens, self.token_dim, **factory)
        self.has_heads = bool(heads)
        if not heads:
            return
        h = self.hidden_size
        if encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(
                input_size=self.token_dim,
                hidden_size=h,
                num_layers=self.num_layers,
                dropout=self.dropout,
                bidirectional=True,
                batch_first=True,
                **factory,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * h, 2 * h, **factory), nn.ReLU(), nn.Linear(2 * h, self.token_dim, **factory)
            )
        else:
            # peft always uses three linear layers here, whatever encoder_num_layers says.
            self.mlp_head = nn.Sequential(
                nn.Linear(self.token_dim, h, **factory),
                nn.ReLU(),
                nn.Linear(h, h, **factory),
                nn.ReLU(),
                nn.Linear(h, self.token_dim, **factory),
            )

    def forward(self) -> Tensor:
        embeds = self.embedding.weight
        if not self.has_heads:
            return embeds
        if self.encoder_type == "LSTM":
            return self.mlp_head(self.lstm_head(embeds.unsqueeze(0))[0])[0]
        return self.mlp_head(embeds)

    def extra_repr(self) -> str:
        return (
            f"num_virtual_tokens={self.total_virtual_tokens}, token_dim={self.token_dim}, "
            f"hidden_size={self.hidden_size}, encoder_type={self.encoder_type!r}, heads={self.has_heads}"
        )


@dataclasses.dataclass
class _State:
    task_type: str  # "CAUSAL_LM" or "SEQ_CLS"
    num_virtual_tokens: int
    init: str  # peft's prompt_tuning_init
    init_text: str | None
    tokenizer_name: str | None
    requires_grad: dict[str, bool]  # the flags apply_prompt_tuning changed, to put back
    replaced: dict[str, Tensor]  # base tensors a checkpoint's modules_to_save overwrote
    handle: Any = None
    # Prompt banks: whether a row may go without a prompt (see apply_prompt_tuning's docstring),
    # and why not when it may not.
    no_prompt_rows: bool = False
    no_prompt_why: str = ""


# -- helpers -------------------------------------------------------------------------------------


def _check_model(owner: str, model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model: expected an nn.Module, got {type(model).__name__}")
    return model


def _task_type(owner: str, model: nn.Module) -> str:
    cls = type(model).__name__
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(
            f"{owner}: model: expected a decoder-only causal LM or a sequence classification model, got the "
            f"encoder-decoder {cls}"
        )
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if cls.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    raise TypeError(
        f"{owner}: model: expected a transformers causal LM (*ForCausalLM, *LMHeadModel) or sequence "
        f"classification model (*ForSequenceClassification), got {cls}"
    )


def _input_embeddings(owner: str, model: nn.Module) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    embeddings: Any = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise TypeError(
            f"{owner}: model: expected get_input_embeddings() to return an embedding with a (vocab, hidden) "
            f"weight, got {type(embeddings).__name__}"
        )
    return embeddings


def _weight(embeddings: nn.Module) -> Tensor:
    # _input_embeddings checked it is a 2-D tensor; mypy types module attributes as Tensor | Module.
    return cast(Tensor, embeddings.weight)


def _hidden_size(embeddings: nn.Module) -> int:
    return int(_weight(embeddings).shape[1])


def _prompt_factory(embeddings: nn.Module) -> dict[str, Any]:
    weight = _weight(embeddings)
    # peft keeps prompts in float32 for half-precision models (autocast_adapter_dtype) and casts
    # them to the input embeddings' dtype in the forward.
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    return {"device": weight.device, "dtype": dtype}


def _prompt(module: nn.Module) -> Tensor:
    return module.weight if isinstance(module, PromptEmbedding) else module()


def _state(owner: str, model: nn.Module) -> _State:
    state = model.__dict__.get(_STATE)
    if state is None:
        raise ValueError(
            f"{owner}: model: expected a model prepared by apply_prompt_tuning, got {type(model).__name__}"
        )
    return state


def _model_shape(model: nn.Module) -> tuple[int | None, int | None]:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = getattr(config, "num_attention_heads", getattr(config, "n_head", None))
    layers = getattr(config, "num_hidden_layers", getattr(config, "n_layer", None))
    return heads, layers


def _heads(model: nn.Module) -> list[str]:
    # peft's rule (PeftModelForSequenceClassification): a child whose name contains one of these.
    return [n for n, _ in model.named_children() if n != ATTR and any(h in n for h in _HEAD_NAMES)]


def _bank_row_ids(model: nn.Module, state: _State, bank: MultiPromptEmbedding, batch: int) -> Tensor:
    """The call's per-row prompt ids (``-1`` = no prompt), checked in eager mode."""
    owner = "apply_prompt_tuning"
    if bank._batch_ids is None:
        raise ValueError(f"{owner}: ids: expected the rows' prompts, set by set_prompt_ids(model, ids), got none")
    ids = bank.row_ids()
    if ids.shape[0] != batch:
        raise ValueError(
            f"{owner}: ids: expected one prompt id per row of the batch ({batch}), got {ids.shape[0]} "
            "(set_prompt_ids(model, ids) again for this batch; generate() with num_beams or "
            "num_return_sequences > 1 repeats each row: peftops.generate(model, input_ids, prompt_ids=...) "
            "repeats the ids with it)"
        )
    if not state.no_prompt_rows and not _capturing(ids) and bool((ids < 0).any()):
        raise ValueError(
            f"{owner}: ids: expected a prompt for every row of a {type(model).__name__}, got -1 / None "
            f"({state.no_prompt_why})"
        )
    return ids


def _capturing(ids: Tensor) -> bool:
    return torch.compiler.is_compiling() or (ids.is_cuda and torch.cuda.is_current_stream_capturing())


def _forward_pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    state = model.__dict__.get(_STATE)
    if state is None:
        return None
    kw = call_kwargs(model, args, kwargs)
    # Whatever the caller passed: the model itself validates them.
    input_ids: Any = kw.get("input_ids")
    inputs_embeds: Any = kw.get("inputs_embeds")
    if input_ids is None and inputs_embeds is None:
        return None  # the model's own error says what is missing
    first = input_ids if input_ids is not None else inputs_embeds
    batch, length = first.shape[0], first.shape[1]
    p, causal = state.num_virtual_tokens, state.task_type == "CAUSAL_LM"
    # transformers 5 renamed past_key_values to cache (the old name is still accepted).
    cache = kw.get("cache", kw.get("past_key_values"))
    past = cached_length(cache)
    prompted = past == 0
    module = getattr(model, ATTR)
    bank = module if isinstance(module, MultiPromptEmbedding) else None
    ids = None if bank is None else _bank_row_ids(model, state, bank, batch)

    mask = kw.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dim() != 2:
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"apply_prompt_tuning: attention_mask: expected a 2-D (B, L) tensor, got {got}")
    elif ids is not None:
        # The rows without a prompt need their virtual positions masked out, so every row gets a
        # mask: the user's tokens (the cache's, past the virtual ones, and this call's) attended.
        mask = torch.ones(batch, max(past - p, 0) + length, dtype=torch.long, device=ids.device)
    if mask is not None:
        if ids is None:
            front = mask.new_ones(mask.shape[0], p)
        else:
            # A row without a prompt sees its P virtual positions as left padding: masked keys
            # get exactly zero attention weight, so the row computes what the base model does.
            front = (ids >= 0).to(device=mask.device, dtype=mask.dtype)[:, None].expand(-1, p)
        kw["attention_mask"] = torch.cat([front, mask], dim=1)
    # Positions computed for the user's tokens would miss the prompt: the model counts from the
    # cache instead, which holds the virtual tokens.
    kw.pop("cache_position", None)
    if kw.get("position_ids") is not None:
        warnings.warn(
            "apply_prompt_tuning: position_ids (given, or made by generate()) are ignored, as peft does: with "
            "the virtual tokens in front, the model numbers positions itself, the virtual tokens first",
            stacklevel=2,
        )
        kw["position_ids"] = None
    if ids is not None and state.no_prompt_rows:
        # Counted from the cache, virtual tokens first, as the model would; a row without a
        # prompt counts from its first real token, as the base model alone would. Computed on
        # the device from the ids, so a captured graph follows ids copied in later.
        start = torch.arange(past, past + length + (p if prompted else 0), device=ids.device)
        kw["position_ids"] = (start[None, :] - p * (ids < 0).to(torch.int64)[:, None]).clamp(min=0)
    token_type_ids = kw.get("token_type_ids")
    if token_type_ids is not None:
        if causal:
            warnings.warn("apply_prompt_tuning: token_type_ids are ignored for causal LMs, as peft does", stacklevel=2)
            kw["token_type_ids"] = None
        elif prompted:
            zeros = token_type_ids.new_zeros(token_type_ids.shape[0], p)
            kw["token_type_ids"] = torch.cat([zeros, token_type_ids], dim=1)
    if not prompted:
        return (), kw

    if inputs_embeds is None:
        # A transformers method, which nn.Module's attribute typing does not know.
        embed: nn.Module = cast(Any, model).get_input_embeddings()
        inputs_embeds = embed(input_ids)
    if bank is None:
        prompt = _prompt(module).to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
    else:
        prompt = bank.gather(cast(Tensor, ids)).to(inputs_embeds.device, inputs_embeds.dtype)
    kw["inputs_embeds"] = torch.cat([prompt, inputs_embeds], dim=1)
    if "input_ids" in kw:
        kw["input_ids"] = None
    labels = kw.get("labels")
    if causal and labels is not None:
        kw["labels"] = torch.cat([labels.new_full((labels.shape[0], p), -100), labels], dim=1)
    return (), kw


def _install(owner: str, model: nn.Module, module: nn.Module, state: _State) -> nn.Module:
    state.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    freeze_base(model)  # adapters added by an earlier apply_* keep training
    model.add_module(ATTR, module)
    for param in module.parameters():
        param.requires_grad_(True)
    state.handle = model.register_forward_pre_hook(_forward_pre_hook, with_kwargs=True)
    model.__dict__[_STATE] = state
    return model


def _check_fresh(owner: str, model: nn.Module) -> None:
    if _STATE in model.__dict__ or hasattr(model, ATTR):
        raise ValueError(
            f"{owner}: model: expected a model without prompt tuning, got one that has it already "
            "(remove_prompt_tuning(model) first)"
        )


def _text_init(owner: str, embeddings: nn.Module, init_text: str, tokenizer: Any, n: int) -> Tensor:
    """peft's TEXT init: the text's token embeddings, truncated or repeated to ``n`` tokens."""
    if not callable(tokenizer):
        raise TypeError(f"{owner}: tokenizer: expected a callable tokenizer, got {type(tokenizer).__name__}")
    ids = list(tokenizer(init_text)["input_ids"])
    if not ids:
        raise ValueError(f"{owner}: init_text: expected text that tokenizes to at least one token, got {init_text!r}")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    device = _weight(embeddings).device
    with torch.no_grad():
        return embeddings(torch.tensor(ids, dtype=torch.long, device=device)).detach().clone().float()


# -- public API ----------------------------------------------------------------------------------


def apply_prompt_tuning(
    model: nn.Module,
    num_virtual_tokens: int,
    init_text: str | None = None,
    *,
    tokenizer: Any = None,
    encoder: str | None = None,
    encoder_hidden_size: int | None = None,
    train_head: bool | None = None,
    capacity: int | None = None,
) -> nn.Module:
    """Prompt tuning (``encoder=None``) or P-tuning (``encoder="mlp" | "lstm"``) on a transformers
    causal LM or sequence classification model, in place; returns ``model``.

    The base model is frozen; the prompt (``model.peftops_prompt``) is trainable. The base
    ``state_dict`` keys are unchanged (the prompt's keys are added). ``model(...)`` and
    ``model.generate(...)`` take the same arguments as before and compute what peft's
    ``PeftModelForCausalLM`` / ``PeftModelForSequenceClassification`` compute (see the module
    docstring for masks, labels, positions and the KV cache).

    ``init_text`` (with ``tokenizer``): peft's ``TEXT`` init, the token embeddings of the text,
    truncated or repeated to ``num_virtual_tokens``. Otherwise the prompt starts as
    :class:`peftops.nn.PromptEmbedding` does (uniform in [-0.5, 0.5]); P-tuning encoders start
    as peft's (``encoder_hidden_size`` defaults to the model's hidden size).

    ``train_head``: whether a sequence classification model's head (``classifier`` / ``score``)
    trains with the prompt. ``None`` is peft's default: trained (peft puts it in
    ``modules_to_save``). A causal LM has no such head: ``True`` is then an error.

    ``capacity``: a bank of up to ``capacity`` prompts instead of one
    (``model.peftops_prompt`` is a :class:`peftops.nn.MultiPromptEmbedding`, empty at first;
    prompt tuning only, no ``encoder`` or ``init_text``): :func:`add_prompt` /
    :func:`remove_prompt` fill and free slots, :func:`set_prompt_ids` names each row's prompt,
    and each row computes what the single-prompt model of its prompt computes, in the forward,
    the backward (a slot's gradient is the sum of its rows') and ``generate()``. The slots are
    fixed, so a compiled model does not recompile when prompts change. A row without a prompt
    (``None`` / ``-1``) of a causal LM computes what the base model alone computes: its ``P``
    virtual positions are masked out and its positions are numbered from its first real token
    (with a bank, the hook passes ``position_ids`` itself, numbered from the KV cache, the
    virtual tokens first, as Llama, Mistral, Qwen2 and GPT-2 number them without any). A
    sequence classification model refuses such rows: its head reads a fixed position (BERT's
    first token, which is a virtual token here; a decoder's last), and no mask makes the head
    of a row with masked virtual tokens in front read what the base model's head reads for
    every family.
    """
    owner = "apply_prompt_tuning"
    check_not_wrapped(owner, model)
    _check_model(owner, model)
    p = positive_int(owner, "num_virtual_tokens", num_virtual_tokens)
    task_type = _task_type(owner, model)
    embeddings = _input_embeddings(owner, model)
    hidden = _hidden_size(embeddings)
    if encoder is not None and encoder not in ("mlp", "lstm"):
        raise ValueError(f"{owner}: encoder: expected None, 'mlp' or 'lstm', got {encoder!r}")
    if encoder is None and encoder_hidden_size is not None:
        raise ValueError(f"{owner}: encoder_hidden_size: expected None without an encoder, got {encoder_hidden_size}")
    if init_text is not None:
        if not isinstance(init_text, str):
            raise TypeError(f"{owner}: init_text: expected a str, got {type(init_text).__name__}")
        if tokenizer is None:
            raise TypeError(f"{owner}: tokenizer: expected a tokenizer to turn init_text into tokens, got None")
        if encoder is not None:
            raise ValueError(
                f"{owner}: init_text: expected None with encoder={encoder!r} (P-tuning encoders start random, as "
                f"peft's), got {init_text!r}"
            )
    elif tokenizer is not None:
        raise ValueError(f"{owner}: tokenizer: expected None without init_text (it is only used for it), got one")
    if capacity is not None:
        capacity = positive_int(owner, "capacity", capacity)
        if encoder is not None:
            raise ValueError(
                f"{owner}: encoder: expected None with capacity={capacity} (prompt banks hold plain prompts, "
                f"not P-tuning encoders), got {encoder!r}"
            )
        if init_text is not None:
            raise ValueError(
                f"{owner}: init_text: expected None with capacity={capacity} (the bank starts empty: give each "
                f"prompt's initial embeddings to add_prompt(model, name, init)), got {init_text!r}"
            )
    if train_head is not None and not isinstance(train_head, bool):
        raise TypeError(f"{owner}: train_head: expected None or a bool, got {type(train_head).__name__}")
    if train_head and task_type != "SEQ_CLS":
        raise ValueError(
            f"{owner}: train_head: expected None or False for a {task_type} model (only sequence classification "
            f"models have a classifier/score head), got True"
        )
    if train_head is False and task_type == "SEQ_CLS":
        saved = modules_to_save(model)
        kept = [h for h in _heads(model) if any(s == h or s.startswith(h + ".") for s in saved)]
        if kept:
            # Two requests that contradict: the earlier apply_lora's modules_to_save trains the head.
            raise ValueError(
                f"{owner}: train_head: expected None or True for a model whose head an earlier apply_lora keeps "
                f"trainable (modules_to_save={list(saved)}), got False"
            )
    _check_fresh(owner, model)

    factory = _prompt_factory(embeddings)
    if capacity is not None:
        module: nn.Module = MultiPromptEmbedding(capacity, p, hidden, **factory)
    elif encoder is None:
        embedding = PromptEmbedding(p, hidden, **factory)
        if init_text is not None:
            with torch.no_grad():
                embedding.weight.copy_(_text_init(owner, embeddings, init_text, tokenizer, p))
        module = embedding
    else:
        h = hidden if encoder_hidden_size is None else positive_int(owner, "encoder_hidden_size", encoder_hidden_size)
        module = PromptEncoder(p, hidden, h, encoder.upper(), **factory)
    name = getattr(tokenizer, "name_or_path", None) or None
    # peft refuses a TEXT config without a tokenizer name, so a tokenizer built in memory is
    # recorded as RANDOM: the saved prompt is what matters when loading.
    init = "TEXT" if init_text is not None and name else "RANDOM"
    state = _State(task_type, p, init, init_text if init == "TEXT" else None, name if init == "TEXT" else None, {}, {})
    if capacity is not None:
        state.no_prompt_rows, state.no_prompt_why = _no_prompt_rows(model, task_type)
    _install(owner, model, module, state)
    if task_type == "SEQ_CLS" and train_head is not False:
        for head in _heads(model):
            model.get_submodule(head).requires_grad_(True)
    return model


def remove_prompt_tuning(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_prompt_tuning` (or :func:`load_peft_prompt`): drop the prompt and the
    hook, put back the ``requires_grad`` flags and any base tensors a checkpoint replaced."""
    owner = "remove_prompt_tuning"
    _check_model(owner, model)
    state = _state(owner, model)
    state.handle.remove()
    delattr(model, ATTR)
    del model.__dict__[_STATE]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state.replaced.items():
            _tensor(model, key).copy_(value)
    for name, flag in state.requires_grad.items():
        if name in params:
            params[name].requires_grad_(flag)
    return model


def _no_prompt_rows(model: nn.Module, task_type: str) -> tuple[bool, str]:
    """Whether a bank's rows may go without a prompt on ``model``, and if not, why."""
    if task_type != "CAUSAL_LM":
        return False, (
            "a classification head reads a fixed position, which the prompt occupies; a row without a prompt "
            "cannot read what the base model's head reads"
        )
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return False, (
            f"{type(model).__name__}.forward takes no position_ids, so a row without a prompt cannot be numbered "
            "from its first real token"
        )
    return True, ""


def _bank(owner: str, model: nn.Module) -> MultiPromptEmbedding:
    _check_model(owner, model)
    _state(owner, model)
    bank = getattr(model, ATTR)
    if not isinstance(bank, MultiPromptEmbedding):
        raise ValueError(
            f"{owner}: model: expected a model given a prompt bank (apply_prompt_tuning(..., capacity=N)), got one "
            "with a single prompt"
        )
    return bank


@torch.no_grad()
def add_prompt(model: nn.Module, name: str, init: Tensor | None = None) -> int:
    """Add prompt ``name`` to the bank of a model given to ``apply_prompt_tuning(..., capacity=N)``
    and return its slot. ``init``: its ``(num_virtual_tokens, hidden)`` embeddings (a trained
    single prompt's ``weight``, say); by default uniform in [-0.5, 0.5], as a single prompt
    starts. No parameter changes shape (the slots are fixed), so a compiled model does not
    recompile."""
    owner = "add_prompt"
    bank = _bank(owner, model)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{owner}: name: expected a non-empty str, got {name!r}")
    slots = bank.adapters
    if name in slots:
        raise ValueError(f"{owner}: name: expected a new prompt name, got {name!r} (already in slot {slots[name]})")
    if len(slots) >= bank.capacity:
        raise ValueError(
            f"{owner}: model: all {bank.capacity} slots are in use ({sorted(slots)}); remove_prompt one first"
        )
    shape = (bank.num_virtual_tokens, bank.token_dim)
    if init is not None:
        if not isinstance(init, Tensor):
            raise TypeError(f"{owner}: init: expected None or a torch.Tensor, got {type(init).__name__}")
        if tuple(init.shape) != shape:
            raise ValueError(
                f"{owner}: init: expected shape {shape} (num_virtual_tokens, hidden), got {tuple(init.shape)}"
            )
        if not init.is_floating_point():
            raise TypeError(f"{owner}: init: expected a floating-point tensor, got {init.dtype}")
        if not bool(torch.isfinite(init).all()):
            raise ValueError(f"{owner}: init: expected finite values, got a non-finite one")
    return bank.add_adapter(name, init)


@torch.no_grad()
def remove_prompt(model: nn.Module, name: str) -> nn.Module:
    """Free prompt ``name``'s slot (zeroed, shapes unchanged) and return ``model``. Ids naming
    that slot (set before) are refused by the next eager forward; under ``torch.compile`` or
    CUDA graph capture their rows get no prompt."""
    owner = "remove_prompt"
    bank = _bank(owner, model)
    if not isinstance(name, str) or name not in bank.adapters:
        raise ValueError(f"{owner}: name: expected one of the model's prompts {sorted(bank.adapters)}, got {name!r}")
    bank.remove_adapter(name)
    return model


def set_prompt_ids(model: nn.Module, ids: Tensor | Sequence[str | int | None] | None) -> nn.Module:
    """Name the prompt of each row of the following batches, until set again, and return ``model``.

    ``ids``: one entry per row of the batch actually run (``(B,)``; ``generate()``'s decode steps
    run the same rows; beam search and ``num_return_sequences`` expand the batch and need ids
    for the expanded rows): prompt names, slot ints or ``None`` (no prompt: the row computes what
    the base model computes; causal LMs only, see :func:`apply_prompt_tuning`), or a signed
    integer tensor of slots with ``-1`` for none. A tensor is kept by reference: a CUDA graph
    captured once reads whatever ids are copied into it later (``ids.copy_(new)``), so it must
    live on the model's device and keep its shape. Names, slot ints and a tensor's values now
    are checked here (``ValueError``); a tensor's later contents are checked by the next eager
    forward, and not under ``torch.compile`` or capture, where a free or out-of-range slot's
    rows get no prompt. ``None`` clears the ids: the model refuses to run until they are set again.
    """
    owner = "set_prompt_ids"
    bank = _bank(owner, model)
    state = _state(owner, model)
    if ids is None:
        bank.set_batch_adapters(None)
        return model
    slots = bank.adapters
    expected = f"expected prompt names {sorted(slots)}, slots in use {sorted(slots.values())}"
    expected += (
        " or None / -1 (no prompt)" if state.no_prompt_rows else f" (every row needs one: {state.no_prompt_why})"
    )
    if isinstance(ids, Tensor):
        if ids.is_floating_point() or ids.is_complex() or not ids.dtype.is_signed:
            raise TypeError(f"{owner}: ids: expected a signed integer tensor (-1 = no prompt), got {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"{owner}: ids: expected one id per row, shape (B,), got shape {tuple(ids.shape)}")
        if ids.device != bank.weight.device:
            raise ValueError(
                f"{owner}: ids: expected a tensor on the model's device {bank.weight.device} (it is kept by "
                f"reference), got one on {ids.device}"
            )
        if not _capturing(ids) and ids.numel():
            allowed = set(slots.values()) | ({-1} if state.no_prompt_rows else set())
            for value in ids.tolist():
                if value not in allowed:
                    out = "" if -1 <= value < bank.capacity else f" (out of range for capacity {bank.capacity})"
                    raise ValueError(f"{owner}: ids: {expected}, got {value}{out}")
        bank.set_batch_adapters(ids)
        return model
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(
            f"{owner}: ids: expected a sequence of prompt names / slot ints / None or a tensor, got {type(ids).__name__}"
        )
    out_ids = []
    for ref in ids:
        if ref is None or (isinstance(ref, int) and not isinstance(ref, bool) and ref == -1):
            if not state.no_prompt_rows:
                raise ValueError(f"{owner}: ids: {expected}, got {ref!r}")
            out_ids.append(-1)
        elif isinstance(ref, str):
            if ref not in slots:
                raise ValueError(f"{owner}: ids: {expected}, got {ref!r}")
            out_ids.append(slots[ref])
        elif isinstance(ref, int) and not isinstance(ref, bool):
            if ref not in slots.values():
                raise ValueError(f"{owner}: ids: {expected}, got {ref}")
            out_ids.append(ref)
        else:
            raise TypeError(f"{owner}: ids: expected prompt names, slot ints or None, got {type(ref).__name__}")
    bank.set_batch_adapters(torch.tensor(out_ids, dtype=torch.int64, device=bank.weight.device))
    return model


def _tensor(model: nn.Module, key: str) -> Tensor:
    module_name, _, leaf = key.rpartition(".")
    return getattr(model.get_submodule(module_name) if module_name else model, leaf)


def peft_prompt_state(model: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """``model``'s prompt as peft's ``(adapter_config, state_dict)``: ``PROMPT_TUNING`` or
    ``P_TUNING``, with a sequence classification head as peft's ``modules_to_save``."""
    owner = "save_adapter"
    _check_model(owner, model)
    state = _state(owner, model)
    module = getattr(model, ATTR)
    if isinstance(module, MultiPromptEmbedding):
        raise ValueError(
            f"{owner}: model: expected a single prompt (peft's format holds one), got a bank of "
            f"{module.capacity} prompts; save each prompt's weight (model.{ATTR}.weight[slot]) instead"
        )
    heads, layers = _model_shape(model)
    with torch.no_grad():
        prompt = _prompt(module).detach()
    config: dict[str, Any] = {
        "task_type": state.task_type,
        "num_virtual_tokens": state.num_virtual_tokens,
        "token_dim": int(prompt.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": layers,
        "modules_to_save": None,
        "auto_mapping": None,
        "revision": None,
    }
    if isinstance(module, PromptEncoder):
        config.update(
            peft_type="P_TUNING",
            encoder_reparameterization_type=module.encoder_type,
            encoder_hidden_size=module.hidden_size,
            encoder_num_layers=module.num_layers,
            encoder_dropout=module.dropout,
        )
    else:
        config.update(
            peft_type="PROMPT_TUNING",
            prompt_tuning_init=state.init,
            prompt_tuning_init_text=state.init_text,
            tokenizer_name_or_path=state.tokenizer_name,
            tokenizer_kwargs=None,
        )
    tensors = {"prompt_embeddings": prompt}
    if state.task_type == "SEQ_CLS":
        config["modules_to_save"] = list(_HEAD_NAMES)
        for head in _heads(model):
            for key, value in model.get_submodule(head).state_dict().items():
                tensors[f"{PREFIX}{head}.{key}"] = value
    return config, tensors


def _field_error(owner: str, field: str, expected: str, got: object) -> ValueError:
    return ValueError(f"{owner}: {field}: expected {expected}, got {got!r}")


def load_peft_prompt(
    model: nn.Module, config: dict, state_dict: dict[str, Tensor], adapter_name: str = "default"
) -> nn.Module:
    """Load a peft ``PROMPT_TUNING`` or ``P_TUNING`` checkpoint (its config dict and tensors)
    into the plain transformers ``model``; returns ``model`` prepared as by
    :func:`apply_prompt_tuning`, the prompt trainable.

    A P-tuning checkpoint holds the encoder's output, not the encoder: it loads as a
    :class:`PromptEncoder` without heads, which computes what peft's loaded model computes.
    Checkpoint tensors of ``modules_to_save`` (a classification head) overwrite the model's.
    Raises ``ValueError`` naming any config field peftops does not honour and any tensor that
    lands nowhere.
    """
    owner = "load_adapter"
    _check_model(owner, model)
    if not isinstance(config, dict):
        raise TypeError(f"{owner}: config: expected a dict, got {type(config).__name__}")
    if adapter_name != "default":
        raise ValueError(
            f"{owner}: adapter_name: expected 'default' (a model holds one prompt-tuning adapter), got {adapter_name!r}"
        )
    peft_type = config.get("peft_type")
    if peft_type not in ("PROMPT_TUNING", "P_TUNING"):
        raise _field_error(owner, "peft_type", "'PROMPT_TUNING' or 'P_TUNING'", peft_type)
    known = _COMMON_FIELDS | (_PROMPT_TUNING_FIELDS if peft_type == "PROMPT_TUNING" else _P_TUNING_FIELDS)
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{owner}: {', '.join(unknown)}: fields of a {peft_type} config peftops does not support")
    task_type = _task_type(owner, model)
    if config.get("task_type") not in (None, task_type):
        raise _field_error(
            owner, "task_type", f"{task_type!r} (the model is a {type(model).__name__})", config["task_type"]
        )
    if config.get("num_transformer_submodules") not in (None, 1):
        raise _field_error(
            owner,
            "num_transformer_submodules",
            "1 (decoder-only and encoder-only models)",
            config["num_transformer_submodules"],
        )
    p = config.get("num_virtual_tokens")
    if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 1:
        raise _field_error(owner, "num_virtual_tokens", "an int >= 1", p)
    p = int(p)  # any Integral (a numpy int, say): the prompt and the saved config take a plain int
    embeddings = _input_embeddings(owner, model)
    hidden = _hidden_size(embeddings)
    if config.get("token_dim") not in (None, hidden):
        raise _field_error(owner, "token_dim", f"{hidden} (the model's hidden size)", config["token_dim"])
    if peft_type == "PROMPT_TUNING":
        init = config.get("prompt_tuning_init") or "RANDOM"
        if init not in _INITS:
            raise _field_error(owner, "prompt_tuning_init", f"one of {', '.join(_INITS)}", init)
    else:
        kind = config.get("encoder_reparameterization_type") or "MLP"
        if kind not in ("MLP", "LSTM"):
            raise _field_error(owner, "encoder_reparameterization_type", "'MLP' or 'LSTM'", kind)
    _check_fresh(owner, model)

    if "prompt_embeddings" not in state_dict:
        raise ValueError(f"{owner}: state_dict: expected a 'prompt_embeddings' tensor, got keys {sorted(state_dict)}")
    prompt = state_dict["prompt_embeddings"]
    if tuple(prompt.shape) != (p, hidden):
        raise ValueError(f"{owner}: prompt_embeddings: expected shape ({p}, {hidden}), got {tuple(prompt.shape)}")
    base = model.state_dict()
    extra = {}
    for key, value in state_dict.items():
        if key == "prompt_embeddings":
            continue
        target = key[len(PREFIX) :] if key.startswith(PREFIX) else None
        if target is None or target not in base:
            raise ValueError(f"{owner}: state_dict: the key {key!r} matches no tensor of {type(model).__name__}")
        if base[target].shape != value.shape:
            raise ValueError(f"{owner}: {key}: expected shape {tuple(base[target].shape)}, got {tuple(value.shape)}")
        extra[target] = value

    factory = _prompt_factory(embeddings)
    if peft_type == "PROMPT_TUNING":
        embedding = PromptEmbedding(p, hidden, **factory)
        module: nn.Module = embedding
        weight: Tensor = embedding.weight
        name = config.get("tokenizer_name_or_path")
        state = _State(task_type, p, init, config.get("prompt_tuning_init_text"), name, {}, {})
    else:
        encoder = PromptEncoder(
            p,
            hidden,
            config.get("encoder_hidden_size") or hidden,
            kind,
            config.get("encoder_num_layers") or 2,
            config.get("encoder_dropout") or 0.0,
            heads=False,
            **factory,
        )
        module = encoder
        weight = encoder.embedding.weight
        state = _State(task_type, p, "RANDOM", None, None, {}, {})
    with torch.no_grad():
        weight.copy_(prompt)
        for key, value in extra.items():
            tensor = _tensor(model, key)
            state.replaced[key] = tensor.detach().clone()
            tensor.copy_(value)
    return _install(owner, model, module, state)

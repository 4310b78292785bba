"""Tiny transformers models built from configs, shared by the Hugging Face integration tests.

Each factory seeds the generator, so two calls give the same weights (the usual way to get a
second, independent copy of "the same pretrained model"). Dropout inside the models is off: a
model built from a config is in training mode, and two forwards must agree.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is part of the test extra")

VOCAB = 128


def _decoder(config_cls, model_cls, seed: int, config: dict):
    """A 2-layer decoder, hidden 64, 4 query heads over 2 key/value heads (Llama-style configs)."""
    torch.manual_seed(seed)
    defaults = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return model_cls(config_cls(**{**defaults, **config}))


def llama(seed: int = 0, **config):
    return _decoder(transformers.LlamaConfig, transformers.LlamaForCausalLM, seed, config)


def qwen2(seed: int = 0, **config):
    return _decoder(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, seed, config)


def mistral(seed: int = 0, **config):
    return _decoder(transformers.MistralConfig, transformers.MistralForCausalLM, seed, config)


def gpt2(seed: int = 0, **config):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **{"bos_token_id": 1, "eos_token_id": 2, **config},  # GPT-2's own (50256) is outside this vocabulary
    )
    return transformers.GPT2LMHeadModel(cfg)


def bert(seed: int = 0, head: str = "mlm", **config):
    """``head``: "mlm" (BertForMaskedLM) or "cls" (BertForSequenceClassification, 3 labels)."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        **config,
    )
    cls = transformers.BertForMaskedLM if head == "mlm" else transformers.BertForSequenceClassification
    return cls(cfg)


def token_ids(batch: int = 3, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))

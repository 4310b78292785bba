"""Adapter checkpoints from distributed jobs (issue 16): DCP sharded adapter state resharded
1 -> 2 -> 1 ranks with the optimizer's state, and ``save_adapter`` gathering FSDP2 shards into
the single-process file, bit for bit. One spawn of 2 gloo ranks runs every distributed step;
the tests below check its results against a single process."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.distributed as dist

import peftops
from peftops.integrations.distributed_checkpoint import (
    adapter_state_keys,
    load_sharded_adapter,
    save_sharded_adapter,
)
from tests.distributed.harness import run_ranks
from tests.integrations import hf_models

TARGETS = ["q_proj", "v_proj", "up_proj"]
BATCH = hf_models.token_ids(batch=4, seq=6, seed=3)
STEPS = 2


def _model(randomize: bool = True) -> torch.nn.Module:
    model = peftops.apply_lora(hf_models.llama(), TARGETS, r=4, alpha=8, modules_to_save=["lm_head"])
    if randomize:
        # B = 0 at init would make every LoRA output the base's: a checkpoint that lost the
        # adapter would still pass.
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _step(model, optimizer, ids) -> float:
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def _fsdp2(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _ranks(rank: int, world_size: int, tmp: str) -> dict:
    out: dict = {}
    # 1 -> 2: a single process's checkpoint into an FSDP2 model on 2 ranks.
    model = _fsdp2(_model(randomize=False))
    optimizer = _optimizer(model)
    load_sharded_adapter(model, os.path.join(tmp, "one"))
    with torch.no_grad():
        out["loaded_logits"] = model(BATCH).logits
    # Each rank trains on its half of the batch; FSDP2 averages the gradients.
    local = BATCH.chunk(world_size)[rank]
    for _ in range(STEPS):
        _step(model, optimizer, local)
    with _gathers() as out["sharded_gathers"]:
        save_sharded_adapter(model, os.path.join(tmp, "two"), optimizer=optimizer)
    with _gathers() as out["peft_gathers"]:
        peftops.save_adapter(model, os.path.join(tmp, "peft_fsdp"))
    # Every rank sees the file once save_adapter returned (rank 0 wrote it).
    out["peft_file_seen"] = os.path.isfile(os.path.join(tmp, "peft_fsdp", "adapter_model.safetensors"))
    with torch.no_grad():
        out["trained_logits"] = model(BATCH).logits
    # One more step: equal to the single process's only if the optimizer state was restored.
    _step(model, optimizer, local)
    with torch.no_grad():
        out["next_logits"] = model(BATCH).logits

    # DDP: the 2-rank checkpoint into a replicated model, then save_adapter from the wrapper.
    ddp = torch.nn.parallel.DistributedDataParallel(_model(randomize=False))
    load_sharded_adapter(ddp, os.path.join(tmp, "two"))
    peftops.save_adapter(ddp, os.path.join(tmp, "peft_ddp"))
    dist.barrier()
    with torch.no_grad():
        out["ddp_logits"] = ddp(BATCH).logits

    # A bank under FSDP2: its slots are split across ranks, save_adapter gathers before picking one.
    bank = _fsdp2(_bank())
    save_sharded_adapter(bank, os.path.join(tmp, "bank_dcp"))
    peftops.save_adapter(bank, os.path.join(tmp, "bank_peft"), adapter_name="b")
    return out


def _bank() -> torch.nn.Module:
    model = peftops.apply_lora(hf_models.llama(), ["q_proj", "o_proj"], r=4, alpha=8, capacity=3)
    peftops.nn.add_adapter(model, "a", 2, 4.0)
    peftops.nn.add_adapter(model, "b", 4, 2.0)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


@contextlib.contextmanager
def _gathers():
    """The global shapes of the sharded tensors gathered whole (DTensor.full_tensor) inside."""
    from torch.distributed.tensor import DTensor

    shapes: list[tuple[int, ...]] = []
    original = DTensor.full_tensor

    def recording(self, *args, **kwargs):
        shapes.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    DTensor.full_tensor = recording
    try:
        yield shapes
    finally:
        DTensor.full_tensor = original


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("sharded"))
    model = _model()
    save_sharded_adapter(model, os.path.join(tmp, "one"))
    with torch.no_grad():
        logits = model(BATCH).logits
    return tmp, logits, run_ranks(_ranks, 2, tmp)


def test_one_rank_checkpoint_loads_on_two_ranks(spawned):
    _, logits, results = spawned
    for r in results:
        torch.testing.assert_close(r["loaded_logits"], logits, rtol=0, atol=0)


def _single_from_two(tmp: str):
    """A fresh single-process model and optimizer with the 2-rank checkpoint loaded."""
    model = _model(randomize=False)
    optimizer = _optimizer(model)
    load_sharded_adapter(model, os.path.join(tmp, "two"), optimizer=optimizer)
    return model, optimizer


def test_two_rank_checkpoint_loads_in_one_process_with_optimizer_state(spawned):
    tmp, _, results = spawned
    model, optimizer = _single_from_two(tmp)
    with torch.no_grad():
        trained = model(BATCH).logits
    for r in results:
        torch.testing.assert_close(r["trained_logits"], trained, rtol=0, atol=0)
    assert all(int(s["step"]) == STEPS for s in optimizer.state.values())
    assert len(optimizer.state) == sum(p.requires_grad for p in model.parameters())
    # The next step on the whole batch equals the 2 ranks' step on halves (gradients averaged
    # in another order: float32 rounding apart), which needs AdamW's moments and step count.
    _step(model, optimizer, BATCH)
    with torch.no_grad():
        nxt = model(BATCH).logits
    for r in results:
        torch.testing.assert_close(r["next_logits"], nxt, rtol=1e-5, atol=1e-5)
    # Without the moments the same step lands elsewhere: the comparison above can fail.
    fresh = _model(randomize=False)
    load_sharded_adapter(fresh, os.path.join(tmp, "two"))
    fresh_opt = _optimizer(fresh)
    _step(fresh, fresh_opt, BATCH)
    with torch.no_grad():
        assert (fresh(BATCH).logits - nxt).abs().max() > 1e-3


def test_ddp_model_loads_the_sharded_checkpoint(spawned):
    tmp, _, results = spawned
    model, _ = _single_from_two(tmp)
    with torch.no_grad():
        trained = model(BATCH).logits
    for r in results:
        torch.testing.assert_close(r["ddp_logits"], trained, rtol=0, atol=0)


@pytest.mark.parametrize("wrapper", ["peft_fsdp", "peft_ddp"])
def test_save_adapter_from_ranks_equals_single_process_save(spawned, tmp_path, wrapper):
    tmp, _, results = spawned
    assert all(r["peft_file_seen"] for r in results)
    model, _ = _single_from_two(tmp)
    peftops.save_adapter(model, tmp_path)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        with open(os.path.join(tmp, wrapper, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name
    # Only rank 0 wrote: nothing else in the directory.
    assert sorted(os.listdir(os.path.join(tmp, wrapper))) == ["adapter_config.json", "adapter_model.safetensors"]


def test_only_adapter_tensors_are_gathered(spawned):
    _, _, results = spawned
    trainable = sorted(tuple(p.shape) for p in _model(randomize=False).parameters() if p.requires_grad)
    for r in results:
        # DCP writes each rank's shards: nothing whole.
        assert r["sharded_gathers"] == []
        # save_adapter gathers the adapter (LoRA and the modules_to_save head), never the frozen base.
        assert sorted(r["peft_gathers"]) == trainable


def test_bank_under_fsdp2_saves_as_one_process(spawned, tmp_path):
    tmp, _, _ = spawned
    model = _bank()
    peftops.save_adapter(model, tmp_path, adapter_name="b")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        with open(os.path.join(tmp, "bank_peft", name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name
    loaded = peftops.apply_lora(hf_models.llama(), ["q_proj", "o_proj"], r=4, alpha=8, capacity=3)
    load_sharded_adapter(loaded, os.path.join(tmp, "bank_dcp"))
    ids = ["b", "a", None, "b"]
    peftops.nn.set_batch_adapters(model, ids)
    peftops.nn.set_batch_adapters(loaded, ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded(BATCH).logits, model(BATCH).logits, rtol=0, atol=0)


def test_save_adapter_from_ranks_loads_in_peft(spawned):
    peft = pytest.importorskip("peft")
    tmp, _, _ = spawned
    model, _ = _single_from_two(tmp)
    loaded = peft.PeftModel.from_pretrained(hf_models.llama(), os.path.join(tmp, "peft_fsdp"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(BATCH).logits, model(BATCH).logits, rtol=1e-6, atol=1e-6)


# -- single process ------------------------------------------------------------------------------


def test_banks_round_trip_with_slot_names(tmp_path):
    def bank():
        return peftops.apply_lora(hf_models.llama(), ["q_proj", "o_proj"], r=4, alpha=8, capacity=3)

    model = bank()
    peftops.nn.add_adapter(model, "a", 2, 4.0)
    peftops.nn.add_adapter(model, "b", 4, 2.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    save_sharded_adapter(model, tmp_path)
    loaded = bank()  # no adapters: the checkpoint brings the slot names, ranks and scales
    load_sharded_adapter(loaded, tmp_path)
    ids = ["a", "b", None, "a"]
    peftops.nn.set_batch_adapters(model, ids)
    peftops.nn.set_batch_adapters(loaded, ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded(BATCH).logits, model(BATCH).logits, rtol=0, atol=0)
    assert loaded.model.layers[1].self_attn.o_proj.adapters == {"a": 0, "b": 1}


def test_adapter_state_keys_are_the_adapters_only():
    model = peftops.apply_lora(hf_models.llama(), ["q_proj"], r=2, alpha=4, modules_to_save=["lm_head"])
    keys = adapter_state_keys(model)
    assert keys == [
        "model.layers.0.self_attn.q_proj.lora_A.weight",
        "model.layers.0.self_attn.q_proj.lora_B.weight",
        "model.layers.1.self_attn.q_proj.lora_A.weight",
        "model.layers.1.self_attn.q_proj.lora_B.weight",
        "lm_head.weight",
    ]
    gpt2 = peftops.apply_lora(hf_models.gpt2(), ["c_attn"], r=2, alpha=4, bias="lora_only")
    assert [k for k in adapter_state_keys(gpt2) if "lora" not in k] == [
        "transformer.h.0.attn.c_attn.bias",
        "transformer.h.1.attn.c_attn.bias",
    ]
    # The other methods: exactly what they train.
    for other in (
        peftops.apply_prefix_tuning(hf_models.llama(), 3, reparam_hidden=8),
        peftops.apply_prompt_tuning(hf_models.llama(), 4),
        peftops.apply_adapters(hf_models.llama(), "seq_bn"),
        peftops.apply_ia3(hf_models.llama()),
        peftops.apply_lora(hf_models.llama(), ["q_proj"], r=2, alpha=4, use_dora=True),
    ):
        trainable = [n for n, p in other.named_parameters() if p.requires_grad]
        assert sorted(adapter_state_keys(other)) == sorted(trainable) and trainable


def test_prefix_tuning_round_trip(tmp_path):
    model = peftops.apply_prefix_tuning(hf_models.llama(), 3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    save_sharded_adapter(model, tmp_path)
    loaded = peftops.apply_prefix_tuning(hf_models.llama(), 3)
    load_sharded_adapter(loaded, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(BATCH).logits, model(BATCH).logits, rtol=0, atol=0)


def test_missing_stray_and_misshaped_keys_are_named(tmp_path):
    small = peftops.apply_lora(hf_models.llama(), ["q_proj"], r=2, alpha=4)
    save_sharded_adapter(small, tmp_path / "small")
    big = peftops.apply_lora(hf_models.llama(), ["q_proj", "v_proj"], r=2, alpha=4)
    save_sharded_adapter(big, tmp_path / "big")
    with pytest.raises(
        ValueError, match=r"load_sharded_adapter: path: .*lacks.*model\.layers\.0\.self_attn\.v_proj\.lora_A\.weight"
    ):
        load_sharded_adapter(
            peftops.apply_lora(hf_models.llama(), ["q_proj", "v_proj"], r=2, alpha=4), tmp_path / "small"
        )
    with pytest.raises(ValueError, match=r"load_sharded_adapter: path: .*no place for.*v_proj\.lora_B\.weight"):
        load_sharded_adapter(peftops.apply_lora(hf_models.llama(), ["q_proj"], r=2, alpha=4), tmp_path / "big")
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight: \(2, 64\) vs the model's \(3, 64\)"):
        load_sharded_adapter(peftops.apply_lora(hf_models.llama(), ["q_proj"], r=3, alpha=4), tmp_path / "small")
    target = peftops.apply_lora(hf_models.llama(), ["q_proj"], r=2, alpha=4)
    with pytest.raises(ValueError, match=r"load_sharded_adapter: optimizer: .*holds no optimizer state"):
        load_sharded_adapter(target, tmp_path / "small", optimizer=_optimizer(target))
    with pytest.raises(
        ValueError, match=r"load_sharded_adapter: path: expected a directory written by save_sharded_adapter"
    ):
        load_sharded_adapter(target, tmp_path)
    with pytest.raises(TypeError, match=r"save_sharded_adapter: path: expected a str or os.PathLike, got int"):
        save_sharded_adapter(target, 3)
    everything = torch.optim.SGD(target.parameters(), lr=0.1)
    with pytest.raises(
        ValueError,
        match=r"save_sharded_adapter: optimizer: expected only the model's adapter parameters, got also model\.embed_tokens\.weight",
    ):
        save_sharded_adapter(target, tmp_path / "x", optimizer=everything)
    with pytest.raises(ValueError, match=r"save_sharded_adapter: model: expected peftops adapter layers"):
        save_sharded_adapter(hf_models.llama(), tmp_path / "x")


def test_optimizer_of_another_kind_is_named(tmp_path):
    model = peftops.apply_lora(hf_models.llama(), ["q_proj"], r=2, alpha=4)
    opt = _optimizer(model)
    _step(model, opt, BATCH)
    save_sharded_adapter(model, tmp_path, optimizer=opt)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"load_sharded_adapter: path: .*optimizer state.*exp_avg"):
        load_sharded_adapter(model, tmp_path, optimizer=sgd)

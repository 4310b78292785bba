"""``examples/finetune_hf.py`` end to end, offline: train, save in PEFT format, reload with peft."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft", reason="the hf extra (peft) is part of the test extra")
pytest.importorskip("transformers", reason="the hf extra (transformers) is part of the test extra")

from tests.examples import load_example  # noqa: E402


def test_finetune_example_trains_saves_and_peft_reloads(tmp_path, capsys):
    module = load_example("finetune_hf")
    # main() returns non-zero when the loss did not fall or peft's reloaded model disagrees.
    assert module.main(["--out", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert "peft reloaded the adapter" in capsys.readouterr().out

"""What every PEFT checkpoint shares, whatever the method: the config fields that only describe
where it came from, and the test for a field left at its "off" value."""

from __future__ import annotations

from typing import Any

# Where peft's tuner-based methods (LoRA, IA3) keep the transformers model: checkpoint keys are
# "base_model.model." + the module's name in the transformers model.
PREFIX = "base_model.model."

# PeftConfig's own fields: metadata, saying nothing about the adapter's function.
METADATA_FIELDS = frozenset(
    {
        "peft_type",
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
    }
)


def is_off(value: Any) -> bool:
    """A config value that asks for nothing: unset, False, or empty."""
    return value is None or value is False or (isinstance(value, (dict, list, tuple, str)) and len(value) == 0)


def target_modules_for(names: list[str], all_names: list[str]) -> list[str]:
    """The shortest peft ``target_modules`` list that selects exactly ``names`` among
    ``all_names`` (peft matches a list entry as the whole name or a dotted suffix): the last
    components when they select nothing else, else the full names."""
    suffixes = sorted({n.rpartition(".")[2] for n in names})
    selected = {n for n in all_names if any(n == s or n.endswith("." + s) for s in suffixes)}
    return suffixes if selected == set(names) else sorted(names)

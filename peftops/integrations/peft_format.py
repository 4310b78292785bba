"""What every PEFT checkpoint shares, whatever the method: the config fields that only describe
where it came from, and the test for a field left at its "off" value."""

from __future__ import annotations

from typing import Any

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

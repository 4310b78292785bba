"""The package's public surface: every exported name exists, and importing peftops pulls in
none of the optional Hugging Face libraries."""

from __future__ import annotations

import subprocess
import sys

import peftops


def test_every_exported_name_exists():
    assert [name for name in peftops.__all__ if not hasattr(peftops, name)] == []
    assert len(set(peftops.__all__)) == len(peftops.__all__)


def test_import_needs_no_hf_library():
    code = "import sys, peftops; print(sorted(m for m in ('transformers', 'peft', 'safetensors') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

"""Integrations with other libraries' models: :mod:`peftops.integrations.peft` (HF PEFT).

Each submodule imports its library on first use, so ``import peftops`` never needs them;
they come with the ``hf`` extra (``pip install peftops[hf]``).
"""

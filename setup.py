"""Build script. All metadata lives in pyproject.toml.

The CUDA extension (``csrc/`` -> ``peftops._C``) is added here by the kernel issue that brings
its first source file; CPU-only installs never build it.
"""

from setuptools import setup

setup()

"""``python -m benchmarks``: exits with :func:`benchmarks.harness.main`'s return code."""

import sys

from .harness import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``python -m tailnet``: the ``tailnet`` command line (see :mod:`tailnet.cli`)."""

from __future__ import annotations

import sys

from tailnet.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())

"""``python -m derp``: the same as the ``derper`` command (see :mod:`derp.cli`)."""

from __future__ import annotations

from .cli import main

__all__: list[str] = []

if __name__ == "__main__":
    raise SystemExit(main())

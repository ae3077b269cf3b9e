"""Regenerate the Python protobuf/gRPC modules from ``proto/``.

Usage (from the repository root)::

    python proto/generate.py            # writes tailnet/v2/*
    python proto/generate.py --out DIR  # writes DIR/tailnet/v2/* (used by the freshness test)

The output is committed, so installing the project never needs protoc.
``--proto_path=proto`` mirrors ``proto/tailnet/v2`` onto the ``tailnet.v2``
Python package, so the generated imports need no rewriting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "tailnet/v2/tailnet.proto"


def generate(out: Path) -> None:
    """Run grpc_tools.protoc on the tailnet proto, writing into ``out``."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).resolve().parent / "_proto")
    (out / "tailnet" / "v2").mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"--proto_path={ROOT / 'proto'}",
        f"--proto_path={include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(ROOT / "proto" / PROTO),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo root)")
    ns = parser.parse_args()
    generate(ns.out)


if __name__ == "__main__":
    sys.exit(main())

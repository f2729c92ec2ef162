"""Regenerates the Python code for `proto/` into `gatecast/v1/`. Run with `make proto`.

The generated files are committed and never edited by hand; `tests/test_codegen.py` fails when
they drift from the .proto sources.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every .proto under proto/ into out_dir."""
    from grpc_tools import protoc  # dev dependency; the server only imports the generated code

    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in proto_files():
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto.relative_to(PROTO_DIR)),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")


def main() -> None:
    generate(ROOT)
    print(f"generated code for {len(proto_files())} proto file(s) under {ROOT / 'gatecast'}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Regenerates the Python code for `proto/` into `gatecast/`. Run with `make proto`.

gatecast's own API (proto/gatecast/v1) lands in gatecast/v1; a protocol specification gatecast also
serves (proto/inference: KServe v2) lands under gatecast too (gatecast/inference), so that every
generated module, and every import between them, is `gatecast.<...>`. The generated files are committed
and never edited by hand; tests fail when they drift from the .proto sources.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def module_path(proto: Path) -> Path:
    """Where a .proto sits for protoc, which names the Python module after it: proto/gatecast/v1/x.proto
    as gatecast/v1/x.proto, proto/inference/x.proto as gatecast/inference/x.proto."""
    rel = proto.relative_to(PROTO_DIR)
    return rel if rel.parts[0] == "gatecast" else Path("gatecast", *rel.parts)


def generate(out_dir: Path) -> None:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every .proto under proto/ into out_dir/gatecast/."""
    from grpc_tools import protoc  # dev dependency; the server only imports the generated code

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        protos = [(proto, Path(staging) / module_path(proto)) for proto in proto_files()]
        for proto, staged in protos:
            staged.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(proto, staged)
        for proto, staged in protos:
            args = [
                "grpc_tools.protoc",
                f"-I{staging}",
                f"--python_out={out_dir}",
                f"--pyi_out={out_dir}",
                f"--grpc_python_out={out_dir}",
                str(staged.relative_to(staging)),
            ]
            if protoc.main(args) != 0:
                raise SystemExit(f"protoc failed on {proto}")


def main() -> None:
    from gatecast.apidoc import main as write_api_reference
    from gatecast.settingsdoc import main as write_settings_reference

    generate(ROOT)
    print(f"generated code for {len(proto_files())} proto file(s) under {ROOT / 'gatecast'}", file=sys.stderr)
    write_api_reference()  # docs/api.md, from the proto's comments
    write_settings_reference()  # docs/settings.md, from the Settings model


if __name__ == "__main__":
    main()

"""The proto serves every language: buf lint is clean, Go, Java and C# code generates (buf generate, protoc)
into the packages the file options name, and docs/api.md is the proto's comments as they are now."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from deploy.packages import ensure_installed
from gatecast.apidoc import OUT, read_descriptor, render
from gatecast.codegen import PROTO_DIR, ROOT
from gatecast.errors import UserError

API = "gatecast/v1/forecaster.proto"
BUF_DIR = Path.home() / ".cache" / "gatecast" / "buf"  # npm installs buf here once


def _buf() -> str:
    """buf from PATH, else from npm (@bufbuild/buf ships the binary) into a cache folder."""
    found = shutil.which("buf") or BUF_DIR / "node_modules" / ".bin" / "buf"
    if Path(found).exists():
        return str(found)
    try:
        ensure_installed("npm", "npm")  # a fresh Debian machine may have no npm: Debian packages it
    except UserError as e:
        pytest.skip(str(e))
    BUF_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(BUF_DIR), "@bufbuild/buf"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return str(found)


def _apt(binary: str, package: str) -> str:
    """A Debian-packaged protoc plugin, installed when missing (CI is a clean Debian machine)."""
    try:
        return ensure_installed(binary, package)
    except UserError as e:
        pytest.skip(str(e))


def test_buf_lint_is_clean() -> None:
    run = subprocess.run([_buf(), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def test_buf_lint_catches_a_violation(tmp_path: Path) -> None:
    """The lint really runs over proto/: a message named against the rules fails it."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(PROTO_DIR / "gatecast", tmp_path / "proto" / "gatecast")
    bad = tmp_path / "proto" / API
    bad.write_text(bad.read_text() + "\nmessage bad_name {}\n")
    run = subprocess.run([_buf(), "lint"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "bad_name" in run.stdout


def test_buf_generate_writes_go_and_java_into_their_packages(tmp_path: Path) -> None:
    """buf.gen.yaml as a user runs it: Go messages and gRPC stubs, Java classes."""
    tools = [_apt("protoc-gen-go", "protoc-gen-go"), _apt("protoc-gen-go-grpc", "protoc-gen-go-grpc")]
    tools.append(_apt("protoc", "protobuf-compiler"))  # buf runs protoc for its Java generator
    env = {**os.environ, "PATH": os.pathsep.join([*{str(Path(t).parent) for t in tools}, os.environ["PATH"]])}
    run = subprocess.run([_buf(), "generate", "-o", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    go = tmp_path / "gen/go/gatecast/v1"
    assert "package gatecastv1" in (go / "forecaster.pb.go").read_text()
    assert "func NewForecasterClient(" in (go / "forecaster_grpc.pb.go").read_text()
    java = tmp_path / "gen/java/io/gatecast/v1"
    assert {"Matrix.java", "ForecastRequest.java", "ForecasterProto.java"} <= {p.name for p in java.iterdir()}
    assert "package io.gatecast.v1;" in (java / "Matrix.java").read_text()


def test_csharp_code_generates_into_its_namespace(tmp_path: Path) -> None:
    protoc = _apt("protoc", "protobuf-compiler")  # Debian's protoc has the C# generator built in
    subprocess.run([protoc, f"-I{PROTO_DIR}", f"--csharp_out={tmp_path}", API], check=True, timeout=60)
    assert "namespace Gatecast.V1 {" in (tmp_path / "Forecaster.cs").read_text()


def test_the_api_reference_is_fresh_and_complete() -> None:
    file = read_descriptor()
    text = render(file)
    assert OUT.read_text() == text, "docs/api.md is stale: run `make proto` (python -m gatecast.apidoc)"
    for method in file.service[0].method:
        assert f"| `{method.name}` |" in text
    for message in file.message_type:
        assert f"### {message.name}\n" in text
    undocumented = [line for line in text.splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert not undocumented, f"fields or methods without a comment in the proto: {undocumented}"

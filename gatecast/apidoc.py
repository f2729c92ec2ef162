"""Writes the API reference (docs/api.md) from the comments in proto/gatecast/v1. Run by `make proto`.

protoc parses the .proto with its source info (`--include_source_info`): every comment is attached to the
path of the service, method, message or field it precedes, so the reference is the proto's own words and
cannot drift from it (tests/test_proto.py fails when docs/api.md is stale).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

from gatecast.codegen import PROTO_DIR, ROOT

OUT = ROOT / "docs" / "api.md"
API = "gatecast/v1/forecaster.proto"
# field numbers inside descriptor.proto that SourceCodeInfo paths walk through
FILE_MESSAGE, FILE_SERVICE, FILE_SYNTAX, MESSAGE_FIELD, SERVICE_METHOD = 4, 6, 12, 2, 2
FD = descriptor_pb2.FieldDescriptorProto
SCALARS = {v: k.removeprefix("TYPE_").lower() for k, v in FD.Type.items()}


def read_descriptor(proto: str = API) -> descriptor_pb2.FileDescriptorProto:
    from grpc_tools import protoc  # dev dependency

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", "--include_source_info", f"--descriptor_set_out={out}", proto]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (file,) = [f for f in files.file if f.name == proto]
    return file


def _comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """Leading (else trailing) comment per source path, each line stripped, paragraphs kept."""
    found = {}
    for loc in file.source_code_info.location:
        text = loc.leading_comments or loc.trailing_comments
        if not text and loc.leading_detached_comments:
            text = loc.leading_detached_comments[-1]
        if text:
            lines = [line.strip() for line in text.strip("\n").split("\n")]
            found[tuple(loc.path)] = "\n".join(lines).strip()
    return found


def _escaped(text: str) -> str:
    """Markdown-safe outside `code` spans: <name> would be read as an HTML tag."""
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))


def _one_line(text: str) -> str:
    return _escaped(" ".join(text.split())).replace("|", "\\|")


def _type(field: descriptor_pb2.FieldDescriptorProto, package: str) -> str:
    if field.type in (FD.TYPE_MESSAGE, FD.TYPE_ENUM):
        name = field.type_name.removeprefix(f".{package}.")
        shown = f"[{name}](#{name.lower()})"
    else:
        shown = SCALARS[field.type]
    return f"repeated {shown}" if field.label == FD.LABEL_REPEATED else shown


def render(file: descriptor_pb2.FileDescriptorProto) -> str:
    notes = _comments(file)
    package = file.package
    out = [
        "# gatecast API reference",
        "",
        f"Generated from `proto/{file.name}` by `python -m gatecast.apidoc` (`make proto`); edit the proto's",
        "comments, not this file.",
        "",
        _escaped(notes.get((FILE_SYNTAX,), "")),
        "",
        f"Package `{package}`. Generated code for other languages: "
        + ", ".join(
            f"`{name}` = `{str(value).lower() if isinstance(value, bool) else value}`"
            for name, value in sorted((f.name, v) for f, v in file.options.ListFields())
        )
        + ".",
    ]
    for s, service in enumerate(file.service):
        out += ["", f"## Service `{package}.{service.name}`", ""]
        if doc := notes.get((FILE_SERVICE, s)):
            out += [_escaped(doc), ""]
        out += ["| Method | Request | Response | What it does |", "| --- | --- | --- | --- |"]
        for m, method in enumerate(service.method):
            req = method.input_type.removeprefix(f".{package}.")
            res = method.output_type.removeprefix(f".{package}.")
            req_s = f"stream [{req}](#{req.lower()})" if method.client_streaming else f"[{req}](#{req.lower()})"
            res_s = f"stream [{res}](#{res.lower()})" if method.server_streaming else f"[{res}](#{res.lower()})"
            doc = _one_line(notes.get((FILE_SERVICE, s, SERVICE_METHOD, m), ""))
            out.append(f"| `{method.name}` | {req_s} | {res_s} | {doc} |")
    out += ["", "## Messages"]
    for i, message in enumerate(file.message_type):
        out += ["", f"### {message.name}", ""]
        if doc := notes.get((FILE_MESSAGE, i)):
            out += [_escaped(doc), ""]
        if not message.field:
            out.append("No fields.")
            continue
        out += ["| Field | Number | Type | Meaning |", "| --- | --- | --- | --- |"]
        for j, field in enumerate(message.field):
            doc = _one_line(notes.get((FILE_MESSAGE, i, MESSAGE_FIELD, j), ""))
            if field.HasField("oneof_index"):
                doc = f"One of `{message.oneof_decl[field.oneof_index].name}`. {doc}".strip()
            out.append(f"| `{field.name}` | {field.number} | {_type(field, package)} | {doc} |")
    return "\n".join(out) + "\n"


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render(read_descriptor()))
    print(f"wrote {OUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()

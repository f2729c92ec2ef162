"""Writes the server settings reference (docs/settings.md) from the `Settings` model. Run by `make proto`.

The table is the model's own field names, defaults and descriptions, so it cannot drift from what the
server accepts (tests/test_docs.py fails when docs/settings.md is stale).
"""

from __future__ import annotations

import sys
from typing import Any

from gatecast.codegen import ROOT

OUT = ROOT / "docs" / "settings.md"


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def render() -> str:
    from gatecast.service.settings import Settings

    lines = [
        "# Server settings",
        "",
        "Generated from `service/settings.py` by `make proto` (`python -m gatecast.settingsdoc`); do not edit.",
        "",
        "Each setting comes from, in rising order of precedence: its default, a TOML file",
        "(`gatecast serve --settings FILE`), the environment variable, the `gatecast serve` flag of the same",
        "name. A bad value, or an unknown `GATECAST_*` variable, stops the start with a message naming it.",
        "",
        "| setting | environment variable | `gatecast serve` flag | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
        meaning = (field.description or "").replace("|", "\\|")
        flag = "--" + name.replace("_", "-")
        lines.append(f"| `{name}` | `GATECAST_{name.upper()}` | `{flag}` | {_default(default)} | {meaning} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Generated references stay what their sources say."""

from __future__ import annotations

from gatecast.service.settings import Settings
from gatecast.settingsdoc import OUT, render


def test_the_settings_reference_is_fresh_and_lists_every_setting() -> None:
    text = render()
    assert OUT.read_text() == text, "docs/settings.md is stale: run `make proto` (python -m gatecast.settingsdoc)"
    for name, field in Settings.model_fields.items():
        assert f"| `{name}` | `GATECAST_{name.upper()}` |" in text
        assert field.description, f"setting {name} has no description"

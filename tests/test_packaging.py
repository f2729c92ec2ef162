"""The installed distribution exposes one top-level package, `gatecast` (issue 10)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_only_the_gatecast_package(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("gatecast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"gatecast"}, tops
    # the folders users see are mapped under the one name, the default config travels as package data
    assert "gatecast/service/server.py" in names
    assert "gatecast/training/pipeline.py" in names
    assert "gatecast/training/configs/taylor.toml" in names
    assert not any(n.startswith(("service/", "training/")) for n in names)


def test_the_service_and_training_modules_import_under_gatecast_only() -> None:
    code = (
        "import importlib.util, sys; import gatecast.service.server, gatecast.training.config; "
        "sys.exit(1 if importlib.util.find_spec('service') or importlib.util.find_spec('training') else 0)"
    )
    # run outside the checkout so the folders in the working directory cannot shadow anything
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/", timeout=60)

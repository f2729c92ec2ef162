"""The command line explains itself: every flag's meaning and default, from the one model behind each command;
--version; `gatecast forecast` prints timestamps and stops quietly when its reader goes away."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from gatecast.cli import COMMANDS, FLAG_NAMES, EvaluateArgs, ForecastArgs, build_parser, main
from gatecast.client import Client
from gatecast.service.settings import Settings
from tests.conftest import DEFAULT_MODEL, ROOT, TAYLOR, RunningServer, server_settings

MODELS = {"evaluate": EvaluateArgs, "serve": Settings, "forecast": ForecastArgs}


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()  # every command's flags (train's import torch)


@pytest.mark.parametrize("command", ["train", "evaluate", "serve", "forecast"])
def test_every_flag_says_what_it_means_and_its_default(parser: argparse.ArgumentParser, command: str) -> None:
    sub = _subparser(parser, command)
    flags = [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]
    assert len(flags) > 5
    for action in flags:
        text = action.help or ""
        meaning = text.split("(default")[0].split("(required")[0].strip()
        assert len(meaning) >= 10, f"{command} {action.option_strings or action.dest}: no meaning in {text!r}"
        if action.option_strings:
            assert "(default" in text or "(required" in text, f"{command} {action.option_strings}: {text!r}"
    help_text = sub.format_help()
    assert "%" not in help_text.replace("%%", "")  # argparse formatted every help string


def test_the_flags_are_the_models_fields(parser: argparse.ArgumentParser) -> None:
    from gatecast.training.config import TrainConfig

    for command, model in {**MODELS, "train": TrainConfig}.items():
        dests = {a.dest for a in _subparser(parser, command)._actions}
        assert set(model.model_fields) <= dests, f"{command}: no flag for {set(model.model_fields) - dests}"
    train = _subparser(parser, "train")
    assert "(default: 32)" in train.format_help().replace("\n", " ").replace("  ", " ")
    for field, flag in FLAG_NAMES.items():  # the flags kept from before, with their destinations
        (action,) = [a for a in train._actions if flag in a.option_strings]
        assert action.dest == field


def test_the_kept_flags_and_lists_parse_as_before(parser: argparse.ArgumentParser) -> None:
    args = parser.parse_args(
        [
            *["train", "--target", "a", "--target", "b,c", "--input-season", "24", "--season", "48", "--season"],
            *["336", "--quantiles", "0.1,0.9", "--no-progress", "--covariate", "t", "--extra-season", "12"],
            "--time-index",
        ]
    )
    assert args.targets == ["a", "b", "c"] and args.season == 24 and args.seasons == [48, 336]
    assert args.quantiles == [0.1, 0.9] and args.progress is False and args.covariates == ["t"]
    assert args.extra_seasons == [12] and args.time_index is True
    assert args.hidden_size is None  # a flag not given leaves the value to the config file or the default
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--quantiles", "0.1,x"])
    serve = parser.parse_args(["serve", "--providers", "CPUExecutionProvider", "--max-batch-size", "8"])
    assert serve.providers == ["CPUExecutionProvider"] and serve.max_batch_size == 8


def test_evaluate_defaults_are_trains(capsys: pytest.CaptureFixture[str]) -> None:
    from gatecast.training.config import TrainConfig

    for name in ("val_fraction", "test_fraction"):
        assert EvaluateArgs.model_fields[name].default == TrainConfig.model_fields[name].default
    assert main(["evaluate", str(DEFAULT_MODEL / "1"), "--data", str(TAYLOR), "--val-fraction", "2"]) == 2
    assert "--val-fraction: Input should be less than 1" in capsys.readouterr().err


def test_version_and_help_without_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gatecast.cli", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.stdout.strip() == f"gatecast {importlib.metadata.version('gatecast')}"
    for command, flag in (("serve", "--max-batch-size"), ("train", "--forget-bias"), ("forecast", "--model")):
        code = (
            "import sys; from gatecast.cli import main\n"
            f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            "sys.exit(3 if 'torch' in sys.modules else 0)"
        )
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert run.returncode == 0, f"{command} --help imported torch"  # help answers in a second, not after torch
        assert flag in run.stdout


def test_every_command_is_described() -> None:
    assert set(COMMANDS) == {"train", "evaluate", "diagnose", "serve", "forecast"}


# --- gatecast forecast -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("cli")
    shutil.copytree(DEFAULT_MODEL, repo / "taylor")
    srv = RunningServer(server_settings(repo))
    yield srv
    srv.stop()


def test_forecast_prints_timestamps(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["forecast", "--data", str(TAYLOR), "--model", "taylor", "--server", server.address]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "timestamp,demand_mw"
    assert lines[1].startswith("2000-08-28 00:00:00,") and lines[48].startswith("2000-08-28 23:30:00,")
    assert len(lines) == 49
    with Client(server.address) as client:
        want = client.forecast(pd.read_csv(TAYLOR, index_col=0, parse_dates=True), "taylor")
    got = [float(line.split(",")[1]) for line in lines[1:]]
    assert got == pytest.approx(want["demand_mw"].tolist(), rel=1e-6)
    assert (
        main(["forecast", "--data", str(TAYLOR), "--model", "taylor", "--server", server.address, "--format", "json"])
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["timestamps"][0] == "2000-08-28 00:00:00" and len(doc["forecast"]) == 48


def test_forecast_errors_name_the_problem(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,demand_mw\n2000-01-01 00:00,1\nyesterday,2\n")
    args = ["forecast", "--model", "taylor", "--server", server.address, "--data"]
    assert main([*args, str(bad)]) == 2
    assert "column 'timestamp', row 3: 'yesterday' is not a timestamp" in capsys.readouterr().err
    assert main([*args, str(TAYLOR), "--time-column", "when"]) == 2
    assert "no time column 'when'" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "missing.csv")]) == 2
    assert "no such file" in capsys.readouterr().err
    offsets = tmp_path / "offsets.csv"  # read as training reads it: a clear message, not pandas' traceback
    offsets.write_text("timestamp,demand_mw\n2000-01-01 00:00+01:00,1\n2000-01-01 01:00+02:00,2\n")
    assert main([*args, str(offsets)]) == 2
    assert "has UTC offset +02:00 but row 2 has +01:00" in capsys.readouterr().err
    assert main([*args, str(TAYLOR), "--token-file", str(tmp_path / "no-token")]) == 2
    assert "cannot read the token file" in capsys.readouterr().err


def test_forecast_into_a_closed_pipe_exits_quietly(server: RunningServer) -> None:
    cmd = [sys.executable, "-m", "gatecast.cli", "forecast", "--data", str(TAYLOR), "--model", "taylor"]
    cmd += ["--server", server.address]
    # a real shell pipeline
    piped = subprocess.run(
        [*map(str, ["bash", "-o", "pipefail", "-c", " ".join(cmd) + " | head -1"])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert piped.stdout == "timestamp,demand_mw\n" and piped.returncode == 0, piped.stderr
    assert "Traceback" not in piped.stderr
    # the reader gone before the first byte is written: every write fails
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err, err

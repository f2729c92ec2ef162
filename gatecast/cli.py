"""The `gatecast` command: train, evaluate, serve, forecast.

The flags of each command are generated from the one pydantic model that holds its settings (TrainConfig,
the server's Settings, EvaluateArgs, ForecastArgs): a field's description and default are its help, so
the help cannot drift from what the command does. Each command imports its own package lazily:
`gatecast serve` never loads torch, and only `gatecast train` pays for importing it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from gatecast import is_header_token
from gatecast.errors import UserError

# Flags whose name is not the field's, kept as they were: field -> flag.
FLAG_NAMES = {
    "targets": "--target",
    "covariates": "--covariate",
    "extra_seasons": "--extra-season",
    "season": "--input-season",  # the seasonal input form's season; --season names the baselines' seasons
    "seasons": "--season",
}
POSITIONAL = {"model_dir"}


class EvaluateArgs(BaseModel):
    """`gatecast evaluate`: the split flags are those given to train, so the manifest's scores come back."""

    model_dir: Path = Field(description="the exported model's folder, models/<name>/<version>/")
    data: Path = Field(description="CSV or Parquet file to score on (the training file reproduces the manifest)")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="as given to train: share of rows in validation")
    test_fraction: float = Field(0.15, ge=0, lt=1, description="as given to train: share of rows in the test split")
    val_start: str | None = Field(None, description="as given to train: first timestamp of the validation split")
    test_start: str | None = Field(None, description="as given to train: first timestamp of the test split")
    time_index: bool | None = Field(None, description="the time column is an integer row index")
    stride: int | None = Field(None, ge=1, description="rows between forecast origins (default: as train chooses)")
    seasons: list[int] | None = Field(None, description="seasonal-naive seasons of the baselines")
    fill: Literal["error", "ffill", "interpolate", "zero"] | None = Field(None, description="missing-value policy")


class ForecastArgs(BaseModel):
    """`gatecast forecast`: one forecast from the last rows of a CSV, printed with its timestamps."""

    data: Path = Field(description="CSV with a time column and the model's features")
    model: str = Field(description="model name in the server's repository")
    version: int = Field(0, ge=0, le=2**32 - 1, description="model version; 0: the server's default (highest loaded)")
    server: str = Field("localhost:8500", description="the server's host:port")
    time_column: str | None = Field(None, description="the time column (default: the first column)")
    rows: int | None = Field(None, ge=1, description="use the last N rows (default: the model's context length)")
    format: Literal["csv", "table", "json"] = Field("csv", description="output: timestamp,value rows, a table or JSON")
    timeout: float = Field(10.0, gt=0, description="seconds per call, retries included")
    tls: bool = Field(False, description="connect with TLS (on when --ca-file is given)")
    ca_file: Path | None = Field(None, description="PEM root certificates (default: the system's)")
    cert_file: Path | None = Field(None, description="PEM client certificate chain, for mutual TLS (default: none)")
    key_file: Path | None = Field(None, description="PEM private key of --cert-file (default: none)")
    token_file: Path | None = Field(
        None, description="file holding a bearer token (default: $GATECAST_TOKEN, else none)"
    )


# --- flags from models ---------------------------------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _comma_list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {kind.__name__} values separated by commas, got {text!r}"
            ) from None

    parse.__name__ = f"{kind.__name__} list"
    return parse


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(_show, value)) if value else "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], none_means: str) -> None:
    """One flag per field: --kebab-name (or FLAG_NAMES'), dest the field, help its description and default.

    Every flag defaults to None, so a flag not given leaves the value to the config file or the model.
    `none_means` says what a None default does when the description does not say it."""
    for name, field in model.model_fields.items():
        kind = _unwrap(field.annotation)
        origin = typing.get_origin(kind)
        kw: dict[str, Any] = {}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kw["choices"] = typing.get_args(kind)
        elif origin is list:
            (item,) = typing.get_args(kind)
            kw.update(action="extend", type=_comma_list(item), metavar=FLAG_NAMES.get(name, name).strip("-").upper())
        elif kind in (int, float, str, Path):
            kw["type"] = kind
        else:
            raise TypeError(f"{model.__name__}.{name}: no flag for a {kind}")
        help = (field.description or "").replace("%", "%%")
        if field.is_required():
            help += " (required: no default)" if name not in POSITIONAL else ""
        elif "(default" not in help:
            default = field.get_default(call_default_factory=True)
            shown = none_means if default is None else _show(default)
            help += f" (default: {shown}{'; repeat or separate with commas' if origin is list else ''})"
        elif origin is list:
            help += " (repeat or separate with commas)"
        if name in POSITIONAL:
            parser.add_argument(name, help=help, **kw)
            continue
        flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        parser.add_argument(flag, dest=name, default=None, required=field.is_required(), help=help, **kw)


def given(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The model's fields that were given on the command line."""
    return {k: v for k in model.model_fields if (v := getattr(args, k, None)) is not None}


def parse_model(model: type[BaseModel], args: argparse.Namespace) -> Any:
    try:
        return model.model_validate(given(args, model))
    except ValidationError as e:
        problems = "; ".join(f"--{'.'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}" for x in e.errors())
        raise UserError(problems) from None


# --- commands --------------------------------------------------------------------------------------------


def _train_flags(p: argparse.ArgumentParser) -> None:
    from gatecast.training.config import TrainConfig  # imports torch: only for `gatecast train`

    p.add_argument(
        "--config", type=Path, help="TOML or YAML file of training settings; flags override it (default: none)"
    )
    add_model_flags(p, TrainConfig, "found from the data")


def cmd_train(args: argparse.Namespace) -> int:
    if args.data is not None and not args.data.is_file():
        raise UserError(f"{args.data}: no such file")
    from gatecast.training.config import TrainConfig, build_config
    from gatecast.training.distributed import lead_process
    from gatecast.training.pipeline import run

    published = run(build_config(args.config, given(args, TrainConfig)), started=args.started)
    if not lead_process():  # another process of a torchrun job: rank 0 prints
        return 0
    print(published.table)
    files = ", ".join(sorted(p.name for p in published.path.iterdir()))
    print(f"wrote {published.path}/ ({files})")
    return 0


def _evaluate_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p, EvaluateArgs, "as the model was trained")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from gatecast.training.evaluate import evaluate_model_dir

    _, table = evaluate_model_dir(**parse_model(EvaluateArgs, args).model_dump())
    print(table)
    return 0


def _serve_flags(p: argparse.ArgumentParser) -> None:
    from gatecast.service.settings import Settings

    p.add_argument(
        "--settings",
        type=Path,
        help="settings file (TOML); GATECAST_* variables override it, flags both (default: none)",
    )
    add_model_flags(p, Settings, "unset")


def cmd_serve(args: argparse.Namespace) -> int:
    from gatecast.service.main import serve
    from gatecast.service.settings import Settings

    return serve(args.settings, **given(args, Settings))


def _forecast_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p, ForecastArgs, "none")


def cmd_forecast(args: argparse.Namespace) -> int:
    import json

    from gatecast.client import Client

    opts: ForecastArgs = parse_model(ForecastArgs, args)
    history = _read_time_csv(opts.data, opts.time_column)
    if opts.token_file:
        token: str | None = _read_token(opts.token_file)
    else:  # set but empty: no token, as unset
        token = os.environ.get("GATECAST_TOKEN", "").strip() or None
        if token is not None:
            _check_token(token, "GATECAST_TOKEN")
    client = Client(
        opts.server,
        tls=opts.tls,
        root_certificates=opts.ca_file,
        certificate_chain=opts.cert_file,
        private_key=opts.key_file,
        token=token,
        timeout=opts.timeout,
    )
    with client as c:
        info = c.model_info(opts.model, opts.version)
        out = c.forecast(history, opts.model, opts.version, rows=opts.rows)
    if opts.format == "json":
        targets = list(info.targets)
        doc = {
            "model": out.attrs["model"],
            "version": out.attrs["version"],
            "targets": targets,
            "timestamps": [str(t) for t in out.index],
            "forecast": out[targets].to_numpy().tolist(),
        }
        if info.quantiles:  # columns <target>_q<level>, target-major
            doc.update(quantiles=list(info.quantiles), quantile_forecast=out.drop(columns=targets).to_numpy().tolist())
        print(json.dumps(doc))
    elif opts.format == "table":
        used = min(len(history), opts.rows or info.context_length)
        print(
            f"{out.attrs['model']} v{out.attrs['version']}: {len(out)} steps ahead from the last {used} rows of "
            f"{opts.data}"
        )
        print(out.to_string(float_format=lambda v: f"{v:.3f}"))
    else:
        out.to_csv(sys.stdout, float_format="%.7g", index_label=str(out.index.name))
    return 0


def _read_time_csv(path: Path, time_column: str | None) -> Any:
    """A CSV as a frame indexed by its time column (the first by default): timestamps, or integers for a
    model trained on a row index."""
    import pandas as pd

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        frame = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as e:
        raise UserError(f"{path}: cannot read it as CSV: {e}") from None
    column = time_column or str(frame.columns[0])
    if column not in frame.columns:
        raise UserError(f"{path}: no time column {column!r}; the file has {list(frame.columns)}")
    if not len(frame):
        raise UserError(f"{path}: no data rows")
    from gatecast.training.data import parse_times  # pandas only: no torch

    times = frame.pop(column)
    if not pd.api.types.is_integer_dtype(times.dtype):
        times = parse_times(path, column, times)  # as training reads them: mixed formats, offsets, named rows
    frame.index = pd.Index(times, name=column)
    return frame


def _diagnose_flags(diag: argparse.ArgumentParser) -> None:
    diag_sub = diag.add_subparsers(dest="diagnostic", required=True)
    grads = diag_sub.add_parser(
        "gradients",
        help="||dLoss/dh_t|| at every step of a long window, at initialisation and after a short training",
    )
    grads.add_argument("--cell", choices=["rnn", "lstm", "gru"], help="one cell (default: all three)")
    grads.add_argument("--steps", type=int, required=True, help="sequence length T (required: no default)")
    grads.add_argument("--hidden", type=int, default=32, help="hidden units (default: 32)")
    grads.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    grads.add_argument("--train-steps", type=int, default=200, help="Adam steps of the short training (default: 200)")
    grads.add_argument(
        "--forget-bias",
        type=float,
        default=0.0,
        help="initial forget (lstm) / update (gru) gate bias (default: 0; the rnn, which has no gate, runs as it is)",
    )
    grads.add_argument("--json", type=Path, help="write the per-step norms and the fitted decay here (default: none)")
    grads.add_argument("--png", type=Path, help="write the plot here (default: none)")
    grads.set_defaults(func=cmd_diagnose_gradients)


def _read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise UserError(f"--token-file {path}: cannot read the token file: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"--token-file {path}: not UTF-8 text; a token is printable ASCII") from None
    return _check_token(token, f"--token-file {path}")


def _check_token(token: str, where: str) -> str:
    """A bearer token as a header can carry it: printable ASCII, no spaces (as the server's tokens file)."""
    if not token:
        raise UserError(f"{where}: no token in it")
    if not is_header_token(token):
        raise UserError(f"{where}: a token is printable ASCII without spaces (it is sent as a header)")
    return token


def cmd_diagnose_gradients(args: argparse.Namespace) -> int:
    from gatecast.training.diagnose import CELLS, diagnose_gradients, table

    if args.steps < 2:
        raise UserError("--steps must be at least 2")
    if args.hidden < 1:
        raise UserError("--hidden must be at least 1 (units in the recurrent layer)")
    if args.train_steps < 0:
        raise UserError("--train-steps must be 0 (initialisation only) or more")
    if args.forget_bias and args.cell == "rnn":
        raise UserError("--forget-bias needs a gated cell: a plain RNN has no forget or update gate")
    cells = [args.cell] if args.cell else list(CELLS)  # with --forget-bias the rnn runs without one, to compare
    results = diagnose_gradients(
        cells,
        args.steps,
        hidden=args.hidden,
        seed=args.seed,
        train_steps=args.train_steps,
        json_path=args.json,
        png_path=args.png,
        forget_bias=args.forget_bias,
    )
    print(table(results))
    for path in (args.json, args.png):
        if path is not None:
            print(f"wrote {path}")
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int] | None]
COMMANDS: dict[str, Command] = {
    "train": ("fit a forecaster, score it, export it to the model repository", _train_flags, cmd_train),
    "evaluate": ("score an exported model with onnxruntime on a data file", _evaluate_flags, cmd_evaluate),
    "diagnose": ("diagnostics of the recurrent cells", _diagnose_flags, None),
    "serve": ("run the gRPC server over a model repository", _serve_flags, cmd_serve),
    "forecast": (
        "read a CSV, ask a running server for a forecast, print it with timestamps",
        _forecast_flags,
        cmd_forecast,
    ),
}


def version() -> str:
    try:
        return importlib.metadata.version("gatecast")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser (`command` None), or one where only `command` has its flags: building the train
    flags imports torch, which `gatecast serve` must not pay for."""
    parser = argparse.ArgumentParser(prog="gatecast", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: off)")
    parser.add_argument("--version", action="version", version=f"gatecast {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, add_flags, func) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        if command in (None, name):
            add_flags(p)
        if func is not None:
            p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # --budget-s counts from here, imports included
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else "").parse_args(argv)
    args.started = started
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `gatecast forecast ... | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit stays quiet
        return 0
    except UserError as e:  # anything else keeps its traceback: it is a bug
        print(f"gatecast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

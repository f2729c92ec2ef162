"""The `gatecast` command: train, evaluate, serve, forecast.

Each subcommand imports its own package lazily, so `gatecast serve` never loads torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from gatecast.errors import UserError


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML or YAML file of training settings; flags override it")
    p.add_argument("--data", type=Path, help="CSV or Parquet file with a time column and value columns")
    p.add_argument("--target", dest="targets", action="append", help="target column (repeatable)")
    p.add_argument(
        "--series-column",
        help="long-format file: the column naming each series; one global model is trained over all of them",
    )
    p.add_argument("--covariate", dest="covariates", action="append", help="input-only column (repeatable)")
    p.add_argument("--time-column", help="name of the time column (default: the first column of timestamps)")
    p.add_argument(
        "--time-index",
        action="store_true",
        default=None,
        help="the time column is an integer row index (one step per row), not timestamps",
    )
    p.add_argument("--fill", choices=["error", "ffill", "interpolate", "zero"], help="missing-value policy")
    p.add_argument(
        "--form",
        choices=["auto", "level", "seasonal", "lookback"],
        help="input form (default auto: every form is trained and the best on validation is published)",
    )
    p.add_argument("--lookback", type=int, help="lookback form: rows of the linear map (default: chosen on validation)")
    p.add_argument(
        "--extra-season",
        dest="extra_seasons",
        type=int,
        action="append",
        help="seasonal form: also feed differences to this season (repeatable)",
    )
    p.add_argument(
        "--quantiles",
        type=_floats,
        help="quantile outputs trained with the pinball loss, e.g. 0.1,0.5,0.9 (default: none)",
    )
    p.add_argument("--loss", choices=["mse", "mae"], help="point loss (default mse)")
    p.add_argument(
        "--budget-s", type=float, help="wall-clock seconds for choosing and training the model (default 120)"
    )
    p.add_argument("--tune", type=int, help="run N Optuna trials over the search space instead of the fixed candidates")
    p.add_argument("--cell", choices=["lstm", "gru", "rnn"], help="recurrent cell (default lstm)")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--dropout", type=float)
    p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--forget-bias",
        type=float,
        help="initial forget-gate bias (lstm) or update-gate bias (gru), e.g. 1.0 (default 0: torch's init)",
    )
    p.add_argument(
        "--relative",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="forecast relative to the last observed value (default on)",
    )
    p.add_argument(
        "--input-season",
        dest="season",
        type=int,
        help="seasonal input form: carry this many rows as state, feed differences to one season back",
    )
    p.add_argument("--level-input", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--recent", type=int, help="seasonal form: linear skip from the last N seasonal differences")
    p.add_argument("--ema-decay", type=float, help="keep and export an EMA of the weights (0: off)")
    p.add_argument("--context", type=int, help="window length in rows")
    p.add_argument("--horizon", type=int, help="rows forecast")
    p.add_argument("--train-stride", type=int, help="rows between training windows (default: from --max-train-windows)")
    p.add_argument(
        "--max-train-windows", type=int, help="the default train stride keeps about this many windows (default 4000)"
    )
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--patience", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=["cosine", "plateau", "none"])
    p.add_argument("--clip-norm", type=float)
    p.add_argument("--clip-value", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--test-fraction", type=float)
    p.add_argument("--val-start", help="first timestamp of the validation split")
    p.add_argument("--test-start", help="first timestamp of the test split")
    p.add_argument("--eval-stride", type=int, help="rows between test forecast origins")
    p.add_argument(
        "--season",
        dest="seasons",
        type=int,
        action="append",
        help="seasonal-naive season (repeatable); the first scales MASE",
    )
    p.add_argument("--plot-windows", type=int)
    p.add_argument("--name", help="model name in the repository")
    p.add_argument("--repo", type=Path, help="model repository folder (default models/)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def cmd_train(args: argparse.Namespace) -> int:
    if args.data is not None and not args.data.is_file():  # said before torch is imported (seconds)
        raise UserError(f"{args.data}: no such file")
    from gatecast.training.config import TrainConfig, build_config
    from gatecast.training.pipeline import run

    overrides: dict[str, Any] = {k: getattr(args, k) for k in TrainConfig.model_fields if hasattr(args, k)}
    published = run(build_config(args.config, overrides), started=args.started)
    print(published.table)
    files = ", ".join(sorted(p.name for p in published.path.iterdir()))
    print(f"wrote {published.path}/ ({files})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from gatecast.training.evaluate import evaluate_model_dir

    _, table = evaluate_model_dir(
        args.model_dir,
        args.data,
        test_fraction=args.test_fraction,
        stride=args.stride,
        seasons=args.seasons,
        fill=args.fill,
        val_fraction=args.val_fraction,
        val_start=args.val_start,
        test_start=args.test_start,
        time_index=args.time_index,
    )
    print(table)
    return 0


def cmd_diagnose_gradients(args: argparse.Namespace) -> int:
    from gatecast.training.diagnose import CELLS, diagnose_gradients, table

    if args.steps < 2:
        raise UserError("--steps must be at least 2")
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


def cmd_serve(args: argparse.Namespace) -> int:
    from gatecast.service.main import serve

    return serve(args.settings, repo=args.repo, port=args.port, metrics_port=args.metrics_port, host=args.host)


def cmd_forecast(args: argparse.Namespace) -> int:
    from gatecast.service.client import forecast_cli

    return forecast_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatecast", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fit a forecaster, score it, export it to the model repository")
    _train_args(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="score an exported model with onnxruntime on a data file")
    ev.add_argument("model_dir", type=Path, help="models/<name>/<version>/")
    ev.add_argument("--data", type=Path, required=True)
    ev.add_argument("--val-fraction", type=float, default=0.15, help="as given to train (default 0.15)")
    ev.add_argument("--test-fraction", type=float, default=0.15, help="as given to train (default 0.15)")
    ev.add_argument("--val-start", help="as given to train: first timestamp of the validation split")
    ev.add_argument("--test-start", help="as given to train: first timestamp of the test split")
    ev.add_argument(
        "--time-index",
        action="store_true",
        default=None,
        help="the time column is an integer row index (default: as the model was trained)",
    )
    ev.add_argument("--stride", type=int, help="rows between forecast origins (default: as train chooses)")
    ev.add_argument(
        "--season", dest="seasons", type=int, action="append", help="seasonal-naive season (default: the model's)"
    )
    ev.add_argument(
        "--fill",
        choices=["error", "ffill", "interpolate", "zero"],
        help="missing-value policy (default: as the model was trained)",
    )
    ev.set_defaults(func=cmd_evaluate)

    diag = sub.add_parser("diagnose", help="diagnostics of the recurrent cells")
    diag_sub = diag.add_subparsers(dest="diagnostic", required=True)
    grads = diag_sub.add_parser(
        "gradients",
        help="||dLoss/dh_t|| at every step of a long window, at initialisation and after a short training",
    )
    grads.add_argument("--cell", choices=["rnn", "lstm", "gru"], help="one cell (default: all three)")
    grads.add_argument("--steps", type=int, required=True, help="sequence length T")
    grads.add_argument("--hidden", type=int, default=32, help="hidden units (default 32)")
    grads.add_argument("--seed", type=int, default=0)
    grads.add_argument("--train-steps", type=int, default=200, help="Adam steps of the short training (default 200)")
    grads.add_argument(
        "--forget-bias",
        type=float,
        default=0.0,
        help="initial forget (lstm) / update (gru) gate bias (default 0; the rnn, which has no gate, runs as it is)",
    )
    grads.add_argument("--json", type=Path, help="write the per-step norms and the fitted decay here")
    grads.add_argument("--png", type=Path, help="write the plot here")
    grads.set_defaults(func=cmd_diagnose_gradients)

    serve = sub.add_parser("serve", help="run the gRPC server over a model repository")
    serve.add_argument("--settings", type=Path, help="settings file (TOML); GATECAST_* variables override it")
    serve.add_argument("--repo", type=Path)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--metrics-port", type=int)
    serve.set_defaults(func=cmd_serve)

    fc = sub.add_parser("forecast", help="read a CSV, ask a running server for a forecast, print it")
    fc.add_argument("--data", type=Path, required=True, help="CSV with a time column and the model's features")
    fc.add_argument("--model", required=True)
    fc.add_argument("--version", type=int, default=0)
    fc.add_argument("--server", default="localhost:8500")
    fc.add_argument("--rows", type=int, help="use the last N rows (default: the model's context length)")
    fc.add_argument("--format", choices=["table", "json"], default="table")
    fc.add_argument("--timeout", type=float, default=10.0)
    fc.set_defaults(func=cmd_forecast)
    return parser


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # --budget-s counts from here, imports included
    args = build_parser().parse_args(argv)
    args.started = started
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except UserError as e:  # anything else keeps its traceback: it is a bug
        print(f"gatecast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

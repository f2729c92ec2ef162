"""LSTM vs GRU vs plain RNN on the same data, recipe and budget (epochs), scored on the test split.

python -m benchmarks.cells --config training/configs/taylor.toml --out benchmarks/results/cells.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gatecast.training.config import build_config
from gatecast.training.pipeline import prepare
from gatecast.training.scoring import evaluate
from gatecast.training.train import predict, train

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", type=Path, default=ROOT / "training" / "configs" / "taylor.toml")
    ap.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cells.json")
    args = ap.parse_args()

    rows = []
    for cell in args.cells:
        prep = prepare(build_config(args.config, {"cell": cell, "progress": False}))
        cfg = prep.cfg
        assert cfg.context is not None and cfg.horizon is not None
        result = train(cfg, prep.series, prep.split)
        evaluation, _, _ = evaluate(
            lambda x, r=result: predict(r.model, x),  # type: ignore[misc]
            result.series.values,
            result.split,
            cfg.context,
            cfg.horizon,
            len(result.series.targets),
            cfg.eval_stride or 1,
            prep.seasons,
        )
        rows.append(
            {
                "cell": cell,
                "epochs": result.epochs,
                "best_epoch": result.best_epoch,
                "seconds": round(result.seconds, 1),
                "scores": {k: v.model_dump() for k, v in evaluation.scores.items()},
                "mase_season": evaluation.mase_season,
                "origins": evaluation.origins,
            }
        )
        print(f"{cell}: done in {result.seconds:.0f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": str(args.config), "rows": rows}, indent=2) + "\n")
    season = rows[0]["mase_season"]
    print(f"\n{'forecaster':<22}{'MAE':>10}{'RMSE':>10}{'sMAPE %':>9}{f'MASE(m={season})':>13}{'epochs':>8}{'s':>7}")
    for r in rows:
        s = r["scores"]["model"]
        print(
            f"{r['cell']:<22}{s['mae']:>10.1f}{s['rmse']:>10.1f}{s['smape']:>9.3f}{s['mase']:>13.4f}"
            f"{r['epochs']:>8}{r['seconds']:>7.0f}"
        )
    for name, s in rows[0]["scores"].items():
        if name != "model":
            print(f"{name:<22}{s['mae']:>10.1f}{s['rmse']:>10.1f}{s['smape']:>9.3f}{s['mase']:>13.4f}")
    print(f"({rows[0]['origins']} test origins)\nwrote {args.out}")


if __name__ == "__main__":
    main()

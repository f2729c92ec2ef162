"""The global model trained by one process and by two (torchrun, gloo, CPU) at the same epochs.

Data: ETTh2's seven columns as seven series (benchmarks.accuracy.etth2_long, the usual split), horizon
24, the lookback fixed (so every run trains the same network on the same windows) and a budget large
enough that the epoch limit, not the clock, ends training. Each setting runs the real CLI in a subprocess:

- 1 process with torch's default threads (python -m gatecast.cli train),
- 1 process, 1 thread (OMP_NUM_THREADS=1),
- 2 processes, 1 thread each (torchrun --standalone --nproc_per_node 2, torchrun's default).

Reported: wall time of the command, the training loop's seconds (manifest training.seconds), epochs,
validation MSE (the loss early stopping watches) and the test z-MSE of the card, and the machine's load
average while it ran (other jobs share these cores). Prints a table and writes JSON.

    python -m benchmarks.distributed [--epochs 2] [--lookback 96] [--train-windows 2000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.accuracy import ROOT, etth2_long
from gatecast.manifest import Manifest

SETTINGS: dict[str, tuple[list[str], dict[str, str]]] = {
    "2 processes x 1 thread": (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gatecast.cli"],
        {"OMP_NUM_THREADS": "1"},
    ),
    "1 process, default threads": ([sys.executable, "-m", "gatecast.cli"], {}),
    "1 process, 1 thread": ([sys.executable, "-m", "gatecast.cli"], {"OMP_NUM_THREADS": "1"}),
}


def run(name: str, launcher: list[str], env: dict[str, str], flags: list[str], repo: Path, turn: int) -> dict[str, Any]:
    model = f"etth2_{turn}_" + "".join(c if c.isalnum() else "_" for c in name)
    cmd = [*launcher, "train", *flags, "--name", model, "--repo", str(repo), "--no-progress"]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, check=False)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    m = Manifest.read(repo / model / "1")
    assert m.validation is not None
    return {
        "setting": name,
        "round": turn,
        "world_size": m.training.get("world_size", 1),
        "rank_windows": m.training.get("rank_windows", ""),
        "wall_s": round(wall, 1),
        "train_loop_s": m.training["seconds"],
        "epochs": m.training["epochs"],
        "best_epoch": m.training["best_epoch"],
        "val_mse": m.training["best_val_loss"],
        "test_mse_z": m.evaluation.scores["model"].mse,
        "load_average_1min_after": round(os.getloadavg()[0], 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'setting':<28}{'wall s':>8}{'loop s':>8}{'epochs':>7}{'val MSE':>10}{'test MSE(z)':>12}{'load':>6}"
    head += "  windows/rank"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['setting']:<28}{r['wall_s']:>8.1f}{r['train_loop_s']:>8.1f}{r['epochs']:>7}{r['val_mse']:>10.5f}"
            f"{r['test_mse_z']:>12.5f}{r['load_average_1min_after']:>6.1f}  {r['rank_windows']}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-windows", type=int, default=2000, help="--max-train-windows of every run")
    ap.add_argument("--rounds", type=int, default=2, help="the settings run in turn this many times")
    ap.add_argument("--lookback", type=int, default=96)
    ap.add_argument("--horizon", type=int, default=24)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distributed.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, split, _ = etth2_long(work)
        flags = ["--data", str(data), "--series-column", "series", "--horizon", str(args.horizon), *split]
        flags += ["--lookback", str(args.lookback), "--max-epochs", str(args.epochs), "--patience", "100"]
        flags += ["--budget-s", "3000", "--max-train-windows", str(args.train_windows), "--max-val-windows", "500"]
        doc = {"horizon": args.horizon, "lookback": args.lookback, "epochs": args.epochs, "cores": os.cpu_count()}
        doc["train_windows"] = args.train_windows
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for turn in range(args.rounds):  # interleaved, so a change in the machine's load hits every setting
            for name, (launcher, env) in SETTINGS.items():
                rows.append(run(name, launcher, env, flags, work / "repo", turn))
                print(table(rows[-1:]).splitlines()[1], flush=True)
                doc["median"] = medians(rows)
                args.out.write_text(json.dumps({**doc, "runs": rows}, indent=2) + "\n")  # what is done, if stopped
    print()
    print(f"ETTh2, 7 series, horizon {args.horizon}, lookback {args.lookback}, {args.epochs} epochs", end="")
    print(f", {os.cpu_count()} cores")
    print(table(rows))
    print("medians over the rounds")
    for name, m in medians(rows).items():
        print(
            f"  {name:<28}wall {m['wall_s']:.1f} s, training loop {m['train_loop_s']:.1f} s, val MSE {m['val_mse']:.5f}"
        )
    print(f"wrote {args.out}")


def medians(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for name in SETTINGS:
        mine = [r for r in rows if r["setting"] == name]
        if mine:
            out[name] = {k: float(statistics.median(r[k] for r in mine)) for k in ("wall_s", "train_loop_s", "val_mse")}
    return out


if __name__ == "__main__":
    main()

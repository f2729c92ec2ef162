"""Choosing the model on the validation split, within a wall-clock budget.

The candidates (and the Optuna search space for `--tune N`) live here, in one place. Every choice is
made on validation windows against the naive baselines on the same windows; the test split only reports.

- lookback: the linear map over the last L rows is fitted in closed form for several L and ridge
  strengths; the best pair on validation starts the network, which then learns a correction.
- seasonal: one candidate per season found in the data.
- level: a plain recurrent forecaster relative to the last value.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import TrainConfig
from .data import Series, Split, origins
from .train import TrainResult, default_stride, ridge_fit, ridge_predict, train

log = logging.getLogger(__name__)

RIDGE_LAMBDAS = (0.1, 1.0, 10.0, 100.0, 1000.0)
ENSEMBLE = 3  # the lookback form may average the linear maps of the best few lookback sizes


@dataclass
class Candidate:
    label: str
    cfg: TrainConfig
    result: TrainResult | None = None
    val_mse: float = float("inf")
    note: str = ""
    seconds: float = 0.0  # the candidate's whole wall time: set-up, every validation pass, training


@dataclass
class RidgeChoice:
    lookback: int
    lam: float
    w: np.ndarray
    b: np.ndarray
    val_mse: float


def _zmse(pred: np.ndarray, truth: np.ndarray, std: np.ndarray) -> float:
    return float((((pred - truth) / std) ** 2).mean())


def _truth(
    values: np.ndarray,
    va: np.ndarray,
    horizon: int,
    n_t: int,
    std: np.ndarray | None,
    unit_of: Callable[[np.ndarray], np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray]:
    unit = unit_of(va) if unit_of is not None else std
    assert unit is not None, "give std or unit_of"
    return values[va[:, None] + np.arange(horizon)[None, :]][:, :, :n_t], unit


def lookback_sizes(horizon: int, seasons: list[int], train_rows: int) -> list[int]:
    longest = max(seasons, default=0)
    sizes = {2 * horizon, 4 * horizon, 96, 192, 336, 512, 720}  # the last five: the literature's usual lookbacks
    if longest:
        sizes |= {longest, longest + horizon, 2 * longest, 3 * longest}
    for s in seasons:
        sizes.add(s * max(1, (2 * horizon) // s + 1))
    cap = max(2, train_rows // 4)
    return sorted(x for x in sizes if 2 <= x <= cap)


def choose_ridge(
    series: Series, split: Split, horizon: int, seasons: list[int], deadline: float | None = None
) -> RidgeChoice | None:
    """The lookback and ridge strength with the lowest validation MSE of the linear map alone."""
    values, n_t = series.values, len(series.targets)
    std = values[: split.train_end, :n_t].std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)

    def at(size: int) -> tuple[np.ndarray, np.ndarray]:
        return origins(0, split.train_end, size, horizon), origins(split.train_end, split.val_end, size, horizon)

    sizes = lookback_sizes(horizon, seasons, split.train_end)
    return ridge_search(values, n_t, horizon, sizes, at, std, deadline=deadline)


def ridge_search(
    values: np.ndarray,
    n_t: int,
    horizon: int,
    sizes: list[int],
    at: Callable[[int], tuple[np.ndarray, np.ndarray]],
    std: np.ndarray | None,
    unit_of: Callable[[np.ndarray], np.ndarray] | None = None,
    deadline: float | None = None,
) -> RidgeChoice | None:
    """Tries each lookback size (train and validation origins from `at(size)`) and ridge strength. The map
    works in units of `std`, or of each window's own scale when std is None; validation errors are
    measured in `unit_of(origins)` ([n, 1, targets]; default: std)."""
    # per size: the best strength, its validation predictions and origins
    per_size: list[tuple[RidgeChoice, np.ndarray, np.ndarray]] = []
    for size in sizes:  # shortest first: when the deadline comes, the cheap sizes have been tried
        if deadline is not None and per_size and time.monotonic() > deadline:
            log.info("lookback sizes from %d on not tried: their share of the budget is spent", size)
            break
        tr, va = at(size)
        if tr.size < 4 * size or va.size == 0:
            continue
        tr = tr[:: default_stride(tr.size, 20000)]
        va = va[:: default_stride(va.size, 20000)]  # bounded memory on long series: [origins, L] per call
        truth, unit = _truth(values, va, horizon, n_t, std, unit_of)
        best_here: tuple[RidgeChoice, np.ndarray, np.ndarray] | None = None
        for lam, (w, b) in zip(
            RIDGE_LAMBDAS, ridge_fit(values, tr, size, horizon, n_t, std, RIDGE_LAMBDAS), strict=True
        ):
            pred = ridge_predict(values, va, w, b, n_t, std)
            mse = _zmse(pred, truth, unit)
            if best_here is None or mse < best_here[0].val_mse:
                best_here = (RidgeChoice(size, lam, w, b, mse), pred, va)
        if best_here is not None:
            per_size.append(best_here)
    if not per_size:
        return None
    ranked = sorted(per_size, key=lambda c: c[0].val_mse)
    best = ranked[0][0]
    # the average of the best few sizes' maps is one linear map over the longest of them (each padded with
    # zeros for the rows it does not see): kept when it beats the single best on validation
    top = ranked[:ENSEMBLE]
    if len(top) > 1 and all(np.array_equal(t[2], top[0][2]) for t in top):
        truth, unit = _truth(values, top[0][2], horizon, n_t, std, unit_of)
        mse = _zmse(np.mean([t[1] for t in top], axis=0), truth, unit)
        if mse < best.val_mse:
            longest = max(t[0].lookback for t in top)
            w = np.zeros((horizon, longest), np.float32)
            for c, _, _ in top:
                w[:, longest - c.lookback :] += c.w / len(top)
            b = np.mean([t[0].b for t in top], axis=0).astype(np.float32)
            used = "+".join(str(t[0].lookback) for t in top)
            log.info("average of lookbacks %s: validation MSE %.4f (best single %.4f)", used, mse, best.val_mse)
            best = RidgeChoice(longest, float("nan"), w, b, mse)
    log.info("lookback %d, ridge %g: validation MSE %.4f", best.lookback, best.lam, best.val_mse)
    return best


def candidates(cfg: TrainConfig, seasons: list[int], ridge: RidgeChoice | None) -> list[Candidate]:
    """The fixed candidates in the order they are tried (the strongest first, in case the budget ends)."""
    assert cfg.horizon is not None
    h = cfg.horizon
    out: list[Candidate] = []
    if cfg.form in ("auto", "lookback") and (ridge is not None or cfg.lookback):
        size = cfg.lookback or (ridge.lookback if ridge else 0)
        out.append(Candidate(f"lookback {size}", cfg.model_copy(update={"form": "lookback", "lookback": size})))
    if cfg.form == "seasonal":
        out.append(Candidate(f"seasonal {cfg.season}", cfg))
    elif cfg.form == "auto":
        for s in sorted(seasons, reverse=True):
            upd: dict[str, Any] = {"form": "seasonal", "season": s, "recent": min(24, s), "level_input": False}
            upd["context"] = cfg.context or s + max(2 * h, 48)
            out.append(Candidate(f"seasonal {s}", cfg.model_copy(update=upd)))
    if cfg.form in ("auto", "level"):
        ctx = cfg.context or min(max(4 * h, *seasons, 48), 336)
        out.append(Candidate("level", cfg.model_copy(update={"form": "level", "context": ctx})))
    for c in out:
        if c.cfg.context is None:
            c.cfg = c.cfg.model_copy(update={"context": c.cfg.lookback or c.cfg.season + 2 * h})
    return out


# of --budget-s, the share that choosing and training may use; the rest is for reading the data, scoring
# validation and test, exporting and checking the graph, and the plot
TRAIN_SHARE = 0.7
RESERVE_S = 12.0  # ... and never less than this for them


def training_share(budget_s: float) -> float:
    """Seconds of the budget for choosing and training."""
    return max(min(TRAIN_SHARE * budget_s, budget_s - RESERVE_S), 0.25 * budget_s)


def choose(
    cfg: TrainConfig, series: Series, split: Split, seasons: list[int], started: float | None = None
) -> tuple[Candidate, list[Candidate], RidgeChoice | None]:
    """Trains the candidates within the budget (counted from `started`, default now) and returns the best
    on validation, and all of them."""
    start = time.monotonic() if started is None else started
    budget_end = start + training_share(cfg.budget_s)
    ridge = None
    if cfg.form in ("auto", "lookback"):  # the closed-form fits may take a quarter of the training share
        ridge = choose_ridge(series, split, cfg.horizon or 1, seasons, start + 0.25 * TRAIN_SHARE * cfg.budget_s)
    if cfg.tune:
        cands = tune(cfg, series, split, seasons, ridge, budget_end)
    else:
        cands = candidates(cfg, seasons, ridge)
        for i, c in enumerate(cands):
            left = budget_end - time.monotonic()
            if i > 0 and left <= 0:
                c.note = "skipped: budget spent"
                continue
            deadline = time.monotonic() + max(left, 1.0) / (len(cands) - i)
            _fit(c, series, split, deadline, ridge)
    done = [c for c in cands if c.result is not None]
    if not done:
        raise ValueError("no candidate could be trained within the budget; raise --budget-s")
    best = min(done, key=lambda c: c.val_mse)
    return best, cands, ridge


def _fit(c: Candidate, series: Series, split: Split, deadline: float, ridge: RidgeChoice | None) -> None:
    init = None
    if ridge is not None and c.cfg.form == "lookback" and c.cfg.lookback == ridge.lookback:
        init = (ridge.w, ridge.b)
    began = time.monotonic()
    try:
        c.result = train(c.cfg, series, split, deadline=deadline, ridge=init)
    except ValueError as e:  # a candidate that does not fit the data (too short for its context) is skipped
        c.note = f"skipped: {e}"
        return
    finally:
        c.seconds = time.monotonic() - began
    c.val_mse = c.result.best_val
    log.info("%s: validation MSE %.4f in %.1f s", c.label, c.val_mse, c.seconds)


def tune(
    cfg: TrainConfig,
    series: Series,
    split: Split,
    seasons: list[int],
    ridge: RidgeChoice | None,
    budget_end: float,
) -> list[Candidate]:
    """`--tune N`: N Optuna trials (TPE, seeded) over the search space below, each scored on validation."""
    try:
        import optuna
    except ImportError as e:  # pragma: no cover - optuna is in the train extra
        raise ValueError("--tune needs optuna: pip install 'gatecast[train]'") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    assert cfg.horizon is not None
    forms = ["lookback", "level"] + ([f"seasonal_{s}" for s in seasons])
    if ridge is None:
        forms.remove("lookback")
    cands: list[Candidate] = []

    h = cfg.horizon

    def objective(trial: Any) -> float:
        form = trial.suggest_categorical("form", forms)
        upd: dict[str, Any] = {
            # a forget-gate bias needs a gate: a plain RNN is not tried then
            "cell": trial.suggest_categorical("cell", ["gru", "lstm"] if cfg.forget_bias else ["gru", "lstm", "rnn"]),
            "hidden_size": trial.suggest_categorical("hidden_size", [16, 32, 64]),
            "lr": trial.suggest_float("lr", 1e-3, 2e-2, log=True),
            "weight_decay": trial.suggest_float("weight_decay", 1e-5, 1e-1, log=True),
            "dropout": trial.suggest_float("dropout", 0.0, 0.3),
        }
        if form == "lookback" and ridge is not None:
            upd |= {"form": "lookback", "lookback": ridge.lookback, "context": ridge.lookback}
        elif form.startswith("seasonal_"):
            s = int(form.split("_")[1])
            upd |= {"form": "seasonal", "season": s, "level_input": False, "context": s + 2 * h}
            upd["recent"] = trial.suggest_categorical("recent", [0, min(24, s)])
        else:
            upd |= {
                "form": "level",
                "context": trial.suggest_categorical("context", [2 * h, 4 * h]),
            }
        c = Candidate(f"trial {trial.number}: {form}", cfg.model_copy(update=upd))
        left = budget_end - time.monotonic()
        _fit(c, series, split, time.monotonic() + max(left, 1.0) / max(1, cfg.tune - trial.number), ridge)
        cands.append(c)
        return c.val_mse

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    study.optimize(objective, n_trials=cfg.tune, timeout=max(1.0, budget_end - time.monotonic()))
    return cands

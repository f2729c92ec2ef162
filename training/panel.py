"""One model over many series: `gatecast train --series-column ID` on a long-format file.

The global model is the lookback form with each series scaled by its own mean absolute step, which the
graph computes from what it has seen and carries in a state (m: steps seen and the sum of their sizes),
so a session continues it exactly and one graph serves a series of any scale. Its linear map is fitted
in closed form over the windows of every series (each window in its own scale), chosen on the pooled
validation windows, and the network then learns a correction within the budget.

Each series is split in time on its own (the same fractions or start timestamps) and scored on its own
z-scale (its errors divided by its training std); the card reports the mean over the series.

Under torchrun (training/distributed.py) every process reads the data; rank 0 alone fits the linear map
(the exact single-process fit, sent to the others), the network's batches and validation are shared out
among the ranks, and rank 0 alone scores, exports, publishes and logs.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import cast

import numpy as np
import torch

from gatecast.manifest import DataFingerprint

from .config import TrainConfig
from .data import DataError, Series, Split, load_panel, origins, split_rows
from .detect import find_seasons
from .distributed import Group
from .model import Forecaster
from .pipeline import Published, _baseline_warnings, build_manifest, export_and_publish
from .scoring import format_table, pooled_evaluation
from .search import lookback_sizes, ridge_search, training_share
from .train import fit, model_config, predict, seed_everything

log = logging.getLogger(__name__)


def run_global(cfg: TrainConfig, started: float | None = None) -> Published:
    if cfg.data is None or cfg.series_column is None:
        raise DataError("a global model needs --data and --series-column")
    if cfg.horizon is None:
        raise DataError("no horizon: give --horizon H (rows to forecast)")
    start = time.monotonic() if started is None else started
    group = Group.from_env()
    if not group.lead:  # the other ranks of a torchrun job train quietly
        logging.getLogger("gatecast").setLevel(logging.ERROR)
        cfg = cfg.model_copy(update={"progress": False})
    try:
        return _run(cfg, start, group)
    finally:
        group.close()


def _run(cfg: TrainConfig, start: float, group: Group) -> Published:
    assert cfg.data is not None and cfg.series_column is not None and cfg.horizon is not None
    horizon = cfg.horizon
    panel = load_panel(
        cfg.data, cfg.series_column, cfg.time_column, cfg.targets, cfg.covariates, cfg.fill, cfg.time_index
    )
    parts: list[tuple[Series, Split]] = []
    left_out: list[str] = []
    for s in panel.series:
        try:
            sp = split_rows(s, horizon, horizon, cfg.val_fraction, cfg.test_fraction, cfg.val_start, cfg.test_start)
        except DataError as e:
            left_out.append(f"series {s.series_id} left out: {e}")
            continue
        if float(np.ptp(s.values[: sp.train_end, : len(panel.targets)])) == 0.0:
            left_out.append(
                f"series {s.series_id} left out: constant over its training split, so it has no scale to "
                "learn in (its last value is its best forecast)"
            )
            continue
        parts.append((s, sp))
    for note in left_out:
        log.warning("%s", note)
    if not parts:
        raise DataError(f"{cfg.data}: no series is long enough to split for horizon {horizon}")
    n_t = len(panel.targets)
    seasons = cfg.seasons if cfg.seasons is not None else _common_seasons(parts, n_t)
    values = np.concatenate([s.values for s, _ in parts]).astype(np.float32)
    offsets = np.cumsum([0] + [s.rows for s, _ in parts])[:-1]

    def at(size: int) -> tuple[np.ndarray, np.ndarray]:
        tr = [origins(0, sp.train_end, size, horizon) + o for (_, sp), o in zip(parts, offsets, strict=True)]
        va = [origins(sp.train_end, sp.val_end, size, horizon) + o for (_, sp), o in zip(parts, offsets, strict=True)]
        return np.concatenate(tr), np.concatenate(va)

    # errors are measured in each series' own training std (what the scores report)
    stds = np.stack([np.maximum(s.values[: sp.train_end, :n_t].std(axis=0), 1e-8) for s, sp in parts])
    owner = np.concatenate([np.full(s.rows, i) for i, (s, _) in enumerate(parts)])

    def unit_of(at_: np.ndarray) -> np.ndarray:
        return stds[owner[at_]]  # [n, targets]

    shortest = min(sp.train_end for _, sp in parts)
    sizes = [cfg.lookback] if cfg.lookback else lookback_sizes(horizon, seasons, shortest)
    # rank 0 alone: the closed form is cheap and stays exactly the single-process fit, and its deadline
    # (which decides the lookback sizes tried) is one clock's
    ridge = group.broadcast(
        ridge_search(
            values,
            n_t,
            horizon,
            sizes,
            at,
            std=None,
            unit_of=lambda a: unit_of(a)[:, None, :],
            deadline=start + 0.25 * training_share(cfg.budget_s),
        )
        if group.lead
        else None
    )
    if ridge is None:
        raise DataError(f"{cfg.data}: the training splits are too short for any lookback at horizon {horizon}")
    lookback = ridge.lookback
    gcfg = cfg.model_copy(update={"form": "lookback", "lookback": lookback, "context": lookback})
    train_rows = np.concatenate([s.values[: sp.train_end] for s, sp in parts])
    seed_everything(cfg.seed)  # the same start in one process or several (DDP then sends rank 0's)
    model = Forecaster(model_config(gcfg, panel.features, n_t, train_rows, series_scale=True))
    with torch.no_grad():
        assert model.linear is not None
        model.linear.weight.copy_(torch.from_numpy(ridge.w))
        model.linear.bias.copy_(torch.from_numpy(ridge.b))
        model.linear.requires_grad_(False)
    tr_at, va_at = at(lookback)
    fitted = fit(
        gcfg,
        model,
        values,
        tr_at,
        va_at,
        n_t,
        start + training_share(cfg.budget_s),
        train_unit=unit_of(tr_at),
        val_unit=unit_of(va_at),
        group=group,
    )
    seen = group.gather(group.seen)  # training windows stepped on, per rank
    if not group.lead:  # rank 0 publishes; the others wait for its card
        return group.broadcast(cast(Published, None))
    if group.world > 1:
        log.info("%d processes; training windows stepped on per rank: %s", group.world, seen)
    label = f"global lookback {lookback}"
    log.info(
        "%s over %d series: validation MSE %.4f (ridge alone %.4f)", label, len(parts), fitted.best_val, ridge.val_mse
    )

    def forecast(x: np.ndarray) -> np.ndarray:
        return predict(fitted.model, x)

    validation, _ = pooled_evaluation(forecast, parts, lookback, horizon, n_t, seasons, "validation")
    evaluation, test_rows = pooled_evaluation(forecast, parts, lookback, horizon, n_t, seasons, "test")
    warnings = _baseline_warnings(validation) + left_out
    first = parts[0][0]
    data = DataFingerprint(
        file=panel.path.name,
        sha256=panel.sha256,
        rows=int(sum(s.rows for s, _ in parts)),
        time_column=first.time_column,
        first_time=str(min(s.times.iloc[0] for s, _ in parts)),
        last_time=str(max(s.times.iloc[-1] for s, _ in parts)),
        train_rows=int(sum(sp.train_end for _, sp in parts)),
        validation_rows=int(sum(sp.val_end - sp.train_end for _, sp in parts)),
        test_rows=int(sum(sp.rows - sp.val_end for _, sp in parts)),
    )

    def card(onnx_path):  # type: ignore[no-untyped-def]
        m = build_manifest(
            gcfg,
            label,
            cfg.model_name,
            fitted,
            panel.features,
            panel.targets,
            seasons,
            panel.step_label,
            data,
            evaluation,
            validation,
            warnings,
            onnx_path,
            series_ids=[str(s.series_id) for s, _ in parts],
            series_column=cfg.series_column or "",
        )
        ranks = {"world_size": group.world, "rank_windows": ",".join(map(str, seen))}
        return m.model_copy(update={"training": {**m.training, **ranks}})

    s0, sp0 = parts[0]
    real = np.stack([s0.values[i - lookback : i] for i in np.linspace(lookback, sp0.val_end, 8).astype(int)])
    path, manifest = export_and_publish(fitted.model, lookback, real, gcfg, card, lambda folder, version: None)
    lines = [
        format_table(validation, f"{manifest.name} v{manifest.version}: {label}, {len(parts)} series — validation"),
        format_table(evaluation, "test split (each series on its own z-scale, averaged)"),
        "per series, test MSE on its z-scale: model / best baseline\n" + "\n".join(test_rows),
    ]
    lines.extend(f"WARNING: {w}" for w in warnings)
    return group.broadcast(Published(path=path, manifest=manifest, table="\n\n".join(lines)))


def _common_seasons(parts: list[tuple[Series, Split]], n_t: int) -> list[int]:
    """Seasons found in at least half of the series' training splits."""
    found: Counter[int] = Counter()
    for s, sp in parts:
        found.update(find_seasons(s.values[: sp.train_end, :n_t], s.step, sp.train_end // 3))
    return sorted(m for m, k in found.items() if 2 * k >= len(parts))

"""Training over several processes (training/distributed.py): the global model under torchrun on CPU.

Two gloo processes (torch.multiprocessing, a file rendezvous) check that DDP with the batch dealt out
rank by rank is single-process training on the whole batch, step for step; one real
`torchrun --standalone --nproc_per_node 2 -m gatecast.cli train` run publishes one model that serves.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gatecast.manifest import Manifest
from gatecast.training.config import TrainConfig
from gatecast.training.data import DataError, origins
from gatecast.training.distributed import Group
from gatecast.training.evaluate import evaluate_model_dir
from gatecast.training.model import Forecaster
from gatecast.training.train import WindowSource, fit, forward_window_out, model_config
from tests.conftest import ROOT

LOOKBACK, HORIZON = 12, 4


def _panel(rows: int = 360) -> tuple[np.ndarray, np.ndarray]:
    """Three series of different scales back to back ([rows x 3, 1]) and each row's series."""
    rng = np.random.default_rng(0)
    t = np.arange(rows)
    parts = [
        s * (5 + np.sin(2 * np.pi * t / 24 + k) + 0.2 * rng.standard_normal(rows)) for k, s in enumerate((1, 9, 0.1))
    ]
    return np.concatenate(parts)[:, None].astype(np.float32), np.repeat(np.arange(3), rows)


def _setup() -> tuple[TrainConfig, Forecaster, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    values, owner = _panel()
    rows = len(values) // 3
    at = np.concatenate([origins(k * rows, k * rows + rows, LOOKBACK, HORIZON) for k in range(3)])
    train_at, val_at = at[at % rows < 280], at[at % rows >= 280 + HORIZON]
    unit = np.array([[values[owner == k].std()] for k in range(3)], dtype=np.float32)
    cfg = TrainConfig(
        horizon=HORIZON, lookback=LOOKBACK, context=LOOKBACK, hidden_size=8, batch_size=37, max_epochs=2, progress=False
    )
    torch.manual_seed(0)
    model = Forecaster(model_config(cfg, ["y"], 1, values, series_scale=True))
    assert model.linear is not None
    model.linear.requires_grad_(False)  # as the global model: the closed-form map stays
    return cfg, model, values, train_at, val_at, unit[owner[train_at]], unit[owner[val_at]]


def _worker(rank: int, world: int, rendezvous: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        group = Group.from_env()
        assert (group.rank, group.world, group.owned) == (rank, world, False)
        cfg, model, values, train_at, val_at, train_unit, val_unit = _setup()
        if rank == 1:  # DDP starts every rank from rank 0's weights
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).add_(1.0)

        # one step: the union of the ranks' shares is the whole batch, the step is the whole batch's
        src = WindowSource(values, train_at, LOOKBACK, HORIZON, 1, train_unit)
        solo = copy.deepcopy(model)
        net = group.wrap(model)
        if rank == 1:
            solo.load_state_dict(model.state_dict())
        idx = torch.randperm(len(src), generator=torch.Generator().manual_seed(1))[:37]  # 19 and 18 windows
        mine, weight = group.split(idx)
        assert len(mine) == (19, 18)[rank] and group.seen == len(mine)
        shares = group.gather(sorted(mine.tolist()))
        assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == sorted(idx.tolist())
        for m, step_idx, w in ((net, mine, weight), (solo, idx, 1.0)):
            opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
            xb, yb = src.batch(step_idx)
            loss = w * m.loss(forward_window_out(m, xb), yb, "mse", src.units(step_idx))  # type: ignore[arg-type,operator]
            loss.backward()
            opt.step()
        for (name, a), b in zip(model.state_dict().items(), solo.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} after one step")
        assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), _setup()[1].parameters(), strict=True))

        # the whole loop (AdamW, cosine schedule, clipping, 2 epochs of uneven batches, validation sums):
        # two ranks reach the weights and losses of one process
        _, start, *_ = _setup()
        alone = fit(cfg, copy.deepcopy(start), values, train_at, val_at, 1, None, train_unit, val_unit)
        shared_group = Group.from_env()
        shared = fit(cfg, copy.deepcopy(start), values, train_at, val_at, 1, None, train_unit, val_unit, shared_group)
        assert alone.best_epoch == shared.best_epoch and len(shared.history) == 2
        np.testing.assert_allclose(shared.history, alone.history, rtol=1e-4)
        for a, b in zip(shared.model.state_dict().values(), alone.model.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        seen = shared_group.gather(shared_group.seen)
        assert sum(seen) == 2 * len(train_at) and min(seen) > 0  # every window once per epoch, on one rank
    finally:
        dist.destroy_process_group()


def test_ddp_over_two_processes_equals_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


def test_shares_of_a_batch_are_disjoint_and_weighted() -> None:
    idx = torch.randperm(11)
    ranks = [Group(r, 3) for r in range(3)]
    parts = [g.split(idx) for g in ranks]
    assert sorted(torch.cat([m for m, _ in parts]).tolist()) == list(range(11))
    # each share's mean loss x weight, averaged over the ranks (DDP), is the batch's mean: sum(w_r m_r) / 3 ...
    assert sum(w for _, w in parts) / 3 == pytest.approx(1.0)
    assert [len(m) for m, _ in parts] == [4, 4, 3] and [w for _, w in parts] == [12 / 11, 12 / 11, 9 / 11]
    # a last batch smaller than the world: the rank without a window steps on one with weight 0
    assert Group(2, 3).split(idx[:2]) == (idx[:1], 0.0) and Group(1, 3).split(idx[:2])[1] == 1.5


def test_one_process_group_is_the_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    g = Group.from_env()
    model = torch.nn.Linear(2, 2)
    assert (g.rank, g.world, g.lead) == (0, 1, True) and g.wrap(model) is model
    assert g.sum(1.5, 2) == [1.5, 2.0] and g.any(True) and not g.any(False) and g.broadcast("x") == "x"


def test_only_the_global_model_trains_under_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gatecast.training.pipeline import run

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = TrainConfig(data=tmp_path / "x.csv", horizon=4, repo=tmp_path / "repo")
    with pytest.raises(DataError, match="global model only: give --series-column"):
        run(cfg)


def test_torchrun_two_cpu_processes_publish_one_global_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    frames = []
    for k, (name, scale) in enumerate({"north": 1.0, "south": 30.0, "east": 0.01}.items()):
        n = 420 + 40 * k
        level = scale * (10 + np.sin(2 * np.pi * np.arange(n) / 24 + k) + 0.3 * rng.standard_normal(n))
        frames.append(
            pd.DataFrame({"series": name, "time": pd.date_range("2024-01-01", periods=n, freq="h"), "v": level})
        )
    data = tmp_path / "panel.csv"
    pd.concat(frames).to_csv(data, index=False)
    repo = tmp_path / "repo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "gatecast.cli", "train", "--data", str(data), "--series-column", "series", "--horizon", "8"]
    cmd += ["--budget-s", "60", "--max-epochs", "2", "--lookback", "16", "--hidden-size", "8", "--repo", str(repo)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1 and proc.stdout.count("— validation") == 1  # rank 1 is quiet
    assert [p.name for p in (repo / "panel").iterdir() if not p.name.startswith(".")] == ["1"]
    model_dir = repo / "panel" / "1"
    m = Manifest.read(model_dir)
    assert m.training["world_size"] == 2 and m.series_ids == ["north", "south", "east"]
    per_rank = [int(v) for v in str(m.training["rank_windows"]).split(",")]
    # both ranks stepped on windows, half of each batch each (batches of 64 windows: 32 and 32)
    epochs = int(m.training["epochs"])
    assert len(per_rank) == 2 and per_rank[0] >= per_rank[1] > 0 and per_rank[0] - per_rank[1] <= epochs
    # the exported graph scores the training file as the card says
    evaluation, _ = evaluate_model_dir(model_dir, data)
    got, card = evaluation.scores["model"].mse, m.evaluation.scores["model"].mse
    assert got is not None and card is not None and got == pytest.approx(card, rel=1e-4)

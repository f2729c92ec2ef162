"""Shared fixtures: tiny trained models in a temporary repository, and the real server on loopback."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from gatecast.service import loops
from gatecast.service.server import App, create_server
from gatecast.service.settings import Settings, load_settings
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
TAYLOR = ROOT / "data" / "taylor_halfhourly.csv"
DEFAULT_MODEL = ROOT / "models" / "taylor"


def tiny_config(tmp: Path, **kw: object):  # type: ignore[no-untyped-def]
    from gatecast.training.config import build_config

    base = dict(
        data=TAYLOR,
        context=64,
        horizon=12,
        cell="gru",
        hidden_size=8,
        layers=1,
        max_epochs=1,
        train_stride=16,
        eval_stride=48,
        seasons=[48],
        batch_size=64,
        repo=tmp,
        name="tiny",
        progress=False,
        plot_windows=1,
        threads=1,
    )
    if not kw.get("season") and not kw.get("lookback"):
        base["form"] = "level"
    base.update(kw)
    return build_config(None, base)


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the committed default model and a tiny seasonal LSTM (state h, c and s)."""
    from gatecast.training.pipeline import run

    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(DEFAULT_MODEL, repo / "taylor")
    run(tiny_config(repo, cell="lstm", name="tiny_lstm", layers=2, season=24, context=48))
    return repo


class RunningServer:
    """The real server on its own event loop in a thread, bound to port 0 on loopback."""

    def __init__(self, settings: Settings) -> None:
        self.loop = loops.loop_factory(settings.event_loop)()  # uvloop unless the settings say asyncio
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.app: App = self.call(self._create(settings))  # grpc.aio wants its loop running
        self.call(self.app.start())
        self.address = f"127.0.0.1:{self.app.port}"

    @staticmethod
    async def _create(settings: Settings) -> App:
        return create_server(settings)

    def call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def stop(self) -> None:
        self.call(self.app.stop(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def server_settings(repo: Path, **kw: object) -> Settings:
    base: dict[str, object] = dict(
        repo=repo,
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        providers=["CPUExecutionProvider"],
        max_queue_delay_ms=2.0,
        repo_poll_s=0.2,
        session_sweep_s=0.2,
        forecast_workers=0,  # Forecast in this process; tests/test_forecast_workers.py runs the workers
    )
    base.update(kw)
    return load_settings(None, **base)


@pytest.fixture(scope="module")
def server(model_repo: Path) -> Iterator[RunningServer]:
    srv = RunningServer(server_settings(model_repo))
    yield srv
    srv.stop()


@pytest.fixture()
def stub(server: RunningServer) -> Iterator[pb_grpc.ForecasterStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.ForecasterStub(channel)


def matrix(x):  # type: ignore[no-untyped-def]
    from gatecast.v1 import forecaster_pb2 as pb

    x = np.asarray(x, dtype=np.float32)
    return pb.Matrix(rows=x.shape[0], cols=x.shape[1], values=x.ravel().tolist())


def array(m) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(m.values, dtype=np.float32).reshape(m.rows, m.cols)


def taylor_values() -> np.ndarray:
    return np.loadtxt(TAYLOR, delimiter=",", skiprows=1, usecols=1, dtype=np.float32)[:, None]

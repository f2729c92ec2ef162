"""The Grafana dashboard drawn from real Prometheus data (Grafana itself cannot be installed here).

Starts Prometheus (Debian's `prometheus` binary on loopback, a scratch config scraping every second),
the server in this process over the committed model, and mixed traffic: forecasts, sessions that close,
expire or are refused, bad requests and bursts past the batch queue. Then every target of
deploy/grafana/dashboards/gatecast.json is queried over the run and each panel plotted into one PNG.

    python -m benchmarks.dashboard --seconds 120 --out docs/dashboard.png

tests/test_prometheus.py uses the same pieces against the same dashboard.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from deploy.packages import ensure_installed
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "gatecast.json"
DATA = ROOT / "data" / "taylor_halfhourly.csv"


# --- the dashboard's queries --------------------------------------------------------------------------


def panels(dashboard: Path = DASHBOARD) -> list[dict[str, Any]]:
    return list(json.loads(dashboard.read_text())["panels"])


def rate_interval(scrape_s: float, step_s: float) -> float:
    """Grafana's $__rate_interval: four scrapes, or one step plus one scrape when that is longer."""
    return max(4 * scrape_s, step_s + scrape_s)


def promql(expr: str, model: str, rate_s: float) -> str:
    """A target's expression as Grafana would send it: $model is a regex (".*" for All)."""
    return expr.replace("$__rate_interval", f"{rate_s:g}s").replace("$model", model)


# --- Prometheus ---------------------------------------------------------------------------------------


def listening_port(pid: int) -> int:
    """The TCP port a process listens on, from /proc: Prometheus binds port 0 and does not say which it got."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        link = os.readlink(fd) if fd.is_symlink() else ""
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                return int(cols[1].rsplit(":", 1)[1], 16)
    raise RuntimeError(f"process {pid} listens on no TCP port")


class Prometheus:
    """Prometheus on 127.0.0.1 (a port of its own choosing) scraping one target, data in a scratch folder."""

    def __init__(self, target: str, scrape_s: float = 1.0, binary: str = "prometheus") -> None:
        exe = ensure_installed(binary, "prometheus")
        self.scrape_s = scrape_s
        self.dir = Path(tempfile.mkdtemp(prefix="gatecast-prometheus-"))
        self.config = self.dir / "prometheus.yml"
        self.config.write_text(
            f"global:\n  scrape_interval: {scrape_s:g}s\n  evaluation_interval: {scrape_s:g}s\n"
            f'scrape_configs:\n  - job_name: gatecast\n    static_configs:\n      - targets: ["{target}"]\n'
        )
        self.log = (self.dir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                exe,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                "--web.listen-address=127.0.0.1:0",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            self.url = self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 30.0) -> str:
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}: {self.read_log()[-2000:]}")
            try:
                url = f"http://127.0.0.1:{listening_port(self.proc.pid)}"
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return url
            except (OSError, RuntimeError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready after {timeout:.0f} s: {self.read_log()[-2000:]}")

    def read_log(self) -> str:
        self.log.flush()
        return (self.dir / "prometheus.log").read_text()

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; raises with Prometheus's own error text when the query is refused."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr} if at is None else {"query": expr, "time": at}
        return list(self.api("query", **params)["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return list(self.api("query_range", query=expr, start=start, end=end, step=step)["result"])

    def scrapes(self) -> int:
        """Scrapes of the target so far, successful or not."""
        got = self.query('count_over_time(up{job="gatecast"}[1h])')
        return int(got[0]["value"][1]) if got else 0

    def wait_scrapes(self, n: int, timeout: float = 30.0) -> None:
        """Returns once `n` more scrapes have happened."""
        want = self.scrapes() + n
        give_up = time.monotonic() + timeout
        while self.scrapes() < want:
            if time.monotonic() > give_up:
                raise RuntimeError(f"prometheus did not scrape {n} times in {timeout:.0f} s")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- traffic ------------------------------------------------------------------------------------------


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _matrix(x: np.ndarray) -> pb.Matrix:
    return pb.Matrix(rows=x.shape[0], cols=x.shape[1], values=x.ravel().tolist())


async def drive(address: str, model: str, seconds: float, burst_at: float | None = None) -> collections.Counter[str]:
    """Mixed traffic for `seconds`, counted by status code: Forecast clients, sessions that observe a few
    steps and close (every fourth is abandoned, to expire), a streaming session, a bad request and an
    unknown model every second, and at `burst_at` s sessions and forecasts enough to be refused."""
    values = np.loadtxt(DATA, delimiter=",", skiprows=1, usecols=1, dtype=np.float32)
    codes: collections.Counter[str] = collections.Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ForecasterStub(channel)
        info = await stub.GetModel(pb.GetModelRequest(name=model))
        ctx, n_features = info.context_length, len(info.features)
        rng = np.random.default_rng(0)

        def window(rows: int) -> np.ndarray:
            start = int(rng.integers(0, len(values) - rows))
            return np.tile(values[start : start + rows, None], (1, n_features))

        async def call(rpc: Any, request: Any) -> Any:
            try:
                reply = await rpc(request, timeout=10)
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1
                return None
            codes["OK"] += 1
            return reply

        stop_at = time.monotonic() + seconds

        async def forecasts(pause: float) -> None:
            while time.monotonic() < stop_at:
                await call(stub.Forecast, pb.ForecastRequest(model=model, series=[_matrix(window(ctx))]))
                await asyncio.sleep(pause)

        async def sessions() -> None:
            k = 0
            while time.monotonic() < stop_at:
                k += 1
                opened = await call(stub.OpenSession, pb.OpenSessionRequest(model=model, history=_matrix(window(ctx))))
                if opened is not None and k % 4:  # every fourth is left open, to expire
                    for seq in range(1, 6):
                        req = pb.ObserveRequest(session_id=opened.session_id, sequence=seq, rows=_matrix(window(1)))
                        await call(stub.Observe, req)
                    await call(stub.CloseSession, pb.CloseSessionRequest(session_id=opened.session_id))
                await asyncio.sleep(0.25)

        async def steps(session_id: str, failed: asyncio.Event) -> Any:
            seq = 0
            while time.monotonic() < stop_at and not failed.is_set():
                seq += 1
                yield pb.ObserveRequest(session_id=session_id, sequence=seq, rows=_matrix(window(1)))
                await asyncio.sleep(0.05)

        async def stream() -> None:
            """One streaming session at a time; after an error step (a full queue) the client starts over
            in a new session, as its sequence would otherwise stay one ahead of the server's."""
            while time.monotonic() < stop_at:
                history = _matrix(window(ctx))
                opened = await call(stub.OpenSession, pb.OpenSessionRequest(model=model, history=history))
                if opened is None:
                    await asyncio.sleep(0.25)
                    continue
                failed = asyncio.Event()
                async for reply in stub.Stream(steps(opened.session_id, failed)):
                    if reply.WhichOneof("result") == "error":
                        codes[_CODE_NAMES.get(reply.error.code, str(reply.error.code))] += 1
                        failed.set()
                    else:
                        codes["OK"] += 1
                await call(stub.CloseSession, pb.CloseSessionRequest(session_id=opened.session_id))

        async def mistakes() -> None:
            while time.monotonic() < stop_at:
                wrong = np.zeros((ctx, n_features + 1), np.float32)  # INVALID_ARGUMENT: one column too many
                await call(stub.Forecast, pb.ForecastRequest(model=model, series=[_matrix(wrong)]))
                await call(stub.GetModel, pb.GetModelRequest(name="no-such-model"))  # NOT_FOUND
                await asyncio.sleep(1.0)

        async def burst() -> None:
            if burst_at is None:
                return
            await asyncio.sleep(burst_at)
            history = _matrix(window(ctx))
            opens = [call(stub.OpenSession, pb.OpenSessionRequest(model=model, history=history)) for _ in range(64)]
            big = pb.ForecastRequest(model=model, series=[_matrix(window(ctx))])
            await asyncio.gather(*opens, *(call(stub.Forecast, big) for _ in range(256)))

        await asyncio.gather(forecasts(0.01), forecasts(0.05), sessions(), stream(), mistakes(), burst())
    return codes


# --- the picture --------------------------------------------------------------------------------------


def _legend(fmt: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        fmt = fmt.replace("{{" + key + "}}", value or '""')
    return fmt


# Grafana unit -> (factor, axis label) for the picture
_UNITS = {"s": (1e3, "ms"), "bytes": (2**-20, "MiB"), "percentunit": (100.0, "%"), "reqps": (1.0, "req/s")}


def render(
    prom: Prometheus,
    start: float,
    end: float,
    out: Path,
    model: str = ".*",
    dashboard: Path = DASHBOARD,
    dpi: int = 80,
) -> Path:
    """Each panel of the dashboard over [start, end] into one grid PNG, titles as in Grafana; series that
    stay at 0 all along are drawn but left out of the legend (the pre-created ones are many)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = max(1.0, (end - start) / 300)
    rate_s = rate_interval(prom.scrape_s, step)
    all_panels = panels(dashboard)
    cols = 3
    rows = math.ceil(len(all_panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.4 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, all_panels, strict=False):
        ax.set_title(panel["title"], fontsize=11, loc="left")
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        if panel["type"] == "table":
            rows_text = []
            for target in panel["targets"]:
                for series in prom.query(promql(target["expr"], model, rate_s), at=end):
                    rows_text.append([_legend(target.get("legendFormat", ""), series["metric"]), series["value"][1]])
            ax.axis("off")
            if rows_text:
                table = ax.table(cellText=rows_text, colLabels=["model version: provider", "value"], loc="upper left")
                table.auto_set_font_size(False)
                table.set_fontsize(10)
                table.scale(1, 1.6)
            continue
        scale, axis = _UNITS.get(unit, (1.0, ""))
        log_scale = panel["fieldConfig"]["defaults"].get("custom", {}).get("scaleDistribution", {}).get("type") == "log"
        flat = 0
        for target in panel["targets"]:
            for series in prom.query_range(promql(target["expr"], model, rate_s), start, end, step):
                t = np.array([float(v[0]) for v in series["values"]]) - start
                y = np.array([float(v[1]) for v in series["values"]]) * scale
                label = _legend(target.get("legendFormat", ""), series["metric"])
                if np.nanmax(np.abs(y), initial=0.0) == 0:
                    flat += 1
                    ax.plot(t, y, color="0.8", lw=0.8)
                else:
                    ax.plot(t, y, lw=1.4, label=label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", ncol=2)
        if flat:
            ax.text(0.99, 0.97, f"{flat} series at 0", transform=ax.transAxes, ha="right", va="top", fontsize=7)
        if log_scale:
            ax.set_yscale("log")
        ax.set_ylabel(axis, fontsize=8)
        ax.set_xlim(0, end - start)
        ax.set_xlabel("s", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(all_panels) :]:
        ax.axis("off")
    shown = "All" if model == ".*" else model
    fig.suptitle(f"gatecast dashboard from Prometheus (model: {shown}, rate interval {rate_s:g} s)", fontsize=13)
    fig.subplots_adjust(left=0.04, right=0.99, top=0.95, bottom=0.04, hspace=0.45, wspace=0.16)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


async def _main(args: argparse.Namespace) -> None:
    from gatecast.service.server import create_server
    from gatecast.service.settings import load_settings

    settings = load_settings(
        None,
        repo=args.repo,
        port=0,
        metrics_port=0,
        session_idle_s=5.0,
        session_sweep_s=0.5,
        max_sessions=24,
        max_queue_size=8,
    )
    app = create_server(settings)
    await app.start()
    prom = Prometheus(f"127.0.0.1:{app.metrics_port}")
    try:
        start = time.time()
        await asyncio.sleep(2)
        codes = await drive(f"127.0.0.1:{app.port}", args.model, args.seconds, burst_at=args.seconds / 2)
        await asyncio.sleep(settings.session_idle_s + 1)  # the abandoned sessions expire
        await asyncio.to_thread(prom.wait_scrapes, 2)
        print("requests by status:", dict(codes))
        print("wrote", render(prom, start, time.time(), args.out))
    finally:
        prom.stop()
        await app.stop(grace=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="taylor")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the traffic runs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()

"""The dashboard against a real Prometheus (Debian's package, installed here when missing; run on loopback
with a scratch config, never as the system service) scraping a running server through traffic with
an expiry, rejections and errors: every panel's query returns data, and the events show."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from benchmarks.dashboard import DASHBOARD, Prometheus, drive, panels, promql, rate_interval, render
from deploy.packages import ensure_installed
from gatecast.errors import UserError
from tests.conftest import ROOT, RunningServer, server_settings
from tests.test_lifecycle import _taylor_repo

SCRAPE_S = 1.0
RATE_S = rate_interval(SCRAPE_S, SCRAPE_S)


@pytest.fixture(scope="module")
def prometheus_installed() -> None:
    try:
        ensure_installed("prometheus", "prometheus")
        ensure_installed("promtool", "prometheus")
    except UserError as e:
        pytest.skip(str(e))


@dataclass
class Live:
    srv: RunningServer
    prom: Prometheus
    start: float
    end: float


@pytest.fixture(scope="module")
def live(prometheus_installed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Five seconds of traffic: sessions idle for 1 s expire, a pool of 4 refuses a burst of 64 opens,
    a queue of 4 refuses part of a burst of 256 forecasts, and bad requests fail every second."""
    settings = server_settings(
        _taylor_repo(tmp_path_factory.mktemp("prometheus")), session_idle_s=1.0, max_sessions=4, max_queue_size=4
    )
    srv = RunningServer(settings)
    try:
        prom = Prometheus(f"127.0.0.1:{srv.app.metrics_port}", scrape_s=SCRAPE_S)
        try:
            prom.wait_scrapes(1)  # the zeros are in Prometheus before anything happens
            start = time.time()
            codes = asyncio.run(drive(srv.address, "taylor", seconds=5.0, burst_at=2.0))
            assert codes["OK"] > 100 and codes["INVALID_ARGUMENT"] and codes["RESOURCE_EXHAUSTED"], codes
            time.sleep(1.5)  # the abandoned sessions expire (idle 1 s, swept every 0.2 s)
            prom.wait_scrapes(2)
            yield Live(srv, prom, start, time.time())
        finally:
            prom.stop()
    finally:
        srv.stop()


def _series(live: Live, expr: str, model: str) -> list[dict[str, object]]:
    return live.prom.query_range(promql(expr, model, RATE_S), live.start, live.end, SCRAPE_S)


def _peak(series: dict[str, object]) -> float:
    values = [float(v[1]) for v in series["values"]]  # type: ignore[attr-defined]
    return max((v for v in values if not math.isnan(v)), default=math.nan)


@pytest.mark.parametrize("model", ["taylor", ".*"])  # one model picked, and All
def test_every_dashboard_query_returns_data(live: Live, model: str) -> None:
    empty = []
    for panel in panels():
        for target in panel["targets"]:
            if target.get("instant"):
                result = live.prom.query(promql(target["expr"], model, RATE_S), at=live.end)
                finite = [s for s in result if not math.isnan(float(s["value"][1]))]
            else:
                finite = [s for s in _series(live, target["expr"], model) if not math.isnan(_peak(s))]
            if not finite:
                empty.append(f"{panel['title']} / {target['refId']}: {target['expr']}")
    assert not empty, "\n".join(empty)


def test_the_model_variable_lists_the_loaded_model(live: Live) -> None:
    [variable] = json.loads(DASHBOARD.read_text())["templating"]["list"]
    assert variable["name"] == "model" and variable["allValue"] == ".*"
    assert variable["query"]["query"] == "label_values(gatecast_model_loaded, model)"
    assert live.prom.api("label/model/values", **{"match[]": "gatecast_model_loaded"}) == ["taylor"]


def _panel_peaks(live: Live, title: str, model: str = "taylor") -> dict[str, float]:
    [panel] = [p for p in panels() if p["title"].startswith(title)]
    peaks: dict[str, float] = {}
    for target in panel["targets"]:
        for s in _series(live, target["expr"], model):
            labels: dict[str, str] = s["metric"]  # type: ignore[assignment]
            name = target["legendFormat"].replace("{{model}}", labels.get("model", ""))
            name = name.replace("{{code}}", labels.get("code", ""))
            peaks[name] = _peak(s)
    return peaks


def test_expiry_rejections_and_errors_show_on_their_panels(live: Live) -> None:
    sessions = _panel_peaks(live, "Sessions opened / closed / expired")
    assert sessions["expired"] > 0 and sessions["opened"] > 0 and sessions["closed"] > 0, sessions
    rejected = _panel_peaks(live, "Rejected per s")
    assert rejected["pool taylor"] > 0 and rejected["queue taylor"] > 0, rejected
    errors = _panel_peaks(live, "Error ratio by code")
    assert errors["INVALID_ARGUMENT"] > 0 and errors["RESOURCE_EXHAUSTED"] > 0, errors
    # an unknown model's NOT_FOUND counts under model="": seen with All
    assert _panel_peaks(live, "Error ratio by code", ".*")["NOT_FOUND"] > 0


def test_each_event_counter_was_at_zero_before_its_first_event(live: Live) -> None:
    """What lets rate() see the first event: the series was scraped at 0 before it."""
    for expr in (
        'gatecast_sessions_expired_total{model="taylor"}',
        'gatecast_sessions_rejected_total{model="taylor"}',
        'gatecast_queue_rejected_total{model="taylor"}',
        'gatecast_requests_total{model="taylor",rpc="Forecast",code="INVALID_ARGUMENT"}',
        'gatecast_requests_total{model="",rpc="GetModel",code="NOT_FOUND"}',
    ):
        [series] = live.prom.query_range(expr, live.start - 1, live.end, SCRAPE_S)
        values = [float(v[1]) for v in series["values"]]
        assert values[0] == 0 and values[-1] > 0, (expr, values)


def test_promtool_accepts_the_configs_and_the_metrics(live: Live) -> None:
    for config in (live.prom.config, ROOT / "deploy" / "prometheus.yml"):
        checked = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    url = f"http://127.0.0.1:{live.srv.app.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read()
    linted = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    assert linted.returncode == 0, (linted.stdout + linted.stderr).decode()
    assert b"gatecast_sessions_expired_total" in text and b"process_resident_memory_bytes" in text


def test_the_dashboard_renders_to_a_png(live: Live, tmp_path: Path) -> None:
    out = render(live.prom, live.start, live.end, tmp_path / "dashboard.png", dpi=30)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 20_000


def test_grafana_rate_interval_rests_on_the_real_scrape_interval() -> None:
    """$__rate_interval is four of the data source's timeInterval: it must be Prometheus's scrape_interval,
    or rate() windows hold too few samples (or hide short bursts)."""
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["global"]["scrape_interval"]
    source = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    [datasource] = yaml.safe_load(source.read_text())["datasources"]
    assert datasource["jsonData"]["timeInterval"] == scrape
    exprs = [t["expr"] for p in panels() for t in p["targets"]]
    assert all("[$__rate_interval]" in e for e in exprs if "rate(" in e), exprs

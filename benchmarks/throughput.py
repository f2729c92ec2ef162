"""Side by side in one run (issue 9): a bare grpc.aio echo (the ceiling), Triton through PyTriton serving
the same ONNX graph, and gatecast; unary calls at several concurrencies and one-row streaming.

The same client drives every server, and the server and the client share this machine's cores: figures
are comparable within one run, as ratios to the echo measured in that run. Each point reports what the
client spent beside what the server spent (CPU time per answer, warm-up included), so that a reader sees
how much of the machine the client took.

Two clients, both sending pre-serialized request bytes (no protobuf on the client's hot path, so neither
side's protobuf version matters), both checking every answer:

- `--client h2load` (the default for the unary points): nghttp2's HTTP/2 load generator, in C (Debian's
  nghttp2-client, installed when missing), POSTs one gRPC-framed request (the 5-byte prefix, then the
  bytes) on `--connections` connections with the concurrency split into streams per connection, closed
  loops, for the warm-up and then for the measured seconds (two runs). Two connections by default: what
  the Python client's two processes open (grpc's channels in one process share one connection). It costs
  about 60 us of CPU per call where the Python client costs about 400 (measured against the echo at
  concurrency 128), so at concurrency 128 it leaves the servers about one core more of this two-core
  machine. h2load does not read gRPC's status (an error is HTTP 200 with grpc-status in the trailers), so
  answers are checked by size: one grpc call with the same bytes before the point gives the answer's
  size, and a run counts as good only the requests whose data bytes add up to exactly one such answer each
  (an error carries no message); a point with any request short of it reports those as errors and drops
  its latencies. It sends one request (the first window) every time, where the Python client rotates over
  64: the model's cost does not depend on the values.
- `--client python` (benchmarks/bytes_client.py): grpc's generic callables from `--client-procs`
  processes of asyncio coroutines, each a closed loop; grpc.aio's own work is most of its cost (about 370
  us per unary call). It also drives the one-row streaming points, which h2load cannot (a stream's
  messages need rising sequence numbers and a read between writes).

- echo: benchmarks/echo_server.py answers each call (each stream message) with as many bytes as gatecast
  answers the same request, on the same kind of event loop as gatecast (`--loop`: uvloop by default when
  installed, as gatecast's `event_loop` setting);
- triton: benchmarks/triton_peer.py in its own virtual environment (PyTriton and tritonclient pin protobuf
  below 7, gatecast needs 7), created under ~/.cache/gatecast-bench/triton-venv when missing; onnxruntime
  inside the PyTriton callable runs the same graph, dynamic batching on, two instances;
- gatecast: `gatecast serve` with its defaults, driven through its own API (`Forecast`, `Stream`);
- kserve: the same gatecast server driven through its KServe v2 front (`ModelInfer`, one window per request:
  the protocol and request shape the Triton peer is driven with).

Unary `Observe` (`--observe`, loops in flight, 8 and 64 by default): the Python client, each loop stepping a
session of its own, one row a call, against gatecast and against a second echo that answers with gatecast's
own Observe answer.

Reach: the graph's own CPU per window is measured in process (one thread, the servers' setting; at
batches 8 to 64, the least kept) before the unary points and after them. At each concurrency, the echo's
server and client CPU per call plus that figure is what any server on grpc.aio must spend per answer, so
the machine's cores divided by it is the most such a server could answer here; the run prints it beside
twice Triton's req/s (issue 9's target for `Forecast`) and says whether that target is within reach.

The model: an LSTM 2x64, window 96, horizon 24, trained once (one epoch) on the Taylor series and cached
under ~/.cache/gatecast-bench/repo.

    python -m benchmarks.throughput                 # the full run (about 4 minutes)
    python -m benchmarks.throughput --quick --servers echo gatecast   # a smoke test (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.bytes_client import Counts, Load, observe_bytes
from benchmarks.load import free_port, ort_ceiling, start_server
from deploy.packages import ensure_installed
from gatecast.errors import UserError
from gatecast.manifest import Manifest
from gatecast.service import loops
from gatecast.v1 import forecaster_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "taylor_halfhourly.csv"
CACHE = Path(os.environ.get("GATECAST_BENCH_CACHE", Path.home() / ".cache" / "gatecast-bench"))
MODEL = "bench"
FORECAST = "/gatecast.v1.Forecaster/Forecast"
STREAM = "/gatecast.v1.Forecaster/Stream"
OBSERVE = "/gatecast.v1.Forecaster/Observe"
ECHO_UNARY = "/bench.Echo/Unary"
ECHO_BIDI = "/bench.Echo/Bidi"
TRITON_INFER = "/inference.GRPCInferenceService/ModelInfer"
TRITON_ATTEMPTS = 4
MODEL_BATCHES = (8, 16, 32, 64)  # the batches the graph's own cost per window is measured at (the least is kept)
CLIENT_START_S = 2.0  # client processes start and connect; then all begin at once


# --- the model -----------------------------------------------------------------------------------------


def bench_repo(cache: Path = CACHE) -> Path:
    """A repository holding the benchmark model (LSTM 2x64, window 96, horizon 24), trained once."""
    repo = cache / "repo"
    if (repo / MODEL / "1" / "manifest.json").is_file():
        return repo
    from gatecast.training.config import build_config
    from gatecast.training.pipeline import run

    tmp = Path(tempfile.mkdtemp(prefix="repo-", dir=cache))
    cfg = dict(
        data=DATA,
        context=96,
        horizon=24,
        cell="lstm",
        hidden_size=64,
        layers=2,
        form="level",
        max_epochs=1,
        train_stride=8,
        eval_stride=48,
        seasons=[48],
        repo=tmp,
        name=MODEL,
        progress=False,
        plot_windows=0,
    )
    run(build_config(None, cfg))
    shutil.rmtree(repo, ignore_errors=True)
    tmp.rename(repo)
    return repo


# --- measuring ------------------------------------------------------------------------------------------


def drive(loads: list[Load]) -> dict[str, Any]:
    """Runs one Load per client process, all measuring the same window; throughput, latency, and the
    client's CPU per answer (what the client processes spent over the whole run, warm-up included)."""
    start_at = time.time() + CLIENT_START_S
    procs = []
    for load in loads:
        load.start_at = start_at
        p = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bytes_client"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
        )
        assert p.stdin is not None
        p.stdin.write(pickle.dumps(load))
        p.stdin.close()
        procs.append(p)
    timeout = CLIENT_START_S + max(ld.warmup + ld.seconds for ld in loads) + 180
    results: list[Counts] = []
    for p, load in zip(procs, loads, strict=True):
        assert p.stdout is not None
        out = p.stdout.read()
        results.append(Counts(*pickle.loads(out)) if p.wait(timeout) == 0 else Counts(0, max(1, load.concurrency), []))
    seconds = loads[0].seconds
    lat = np.asarray([x for r in results for x in r.latencies])
    answered = sum(r.answered_all for r in results)
    return {
        "per_s": sum(r.answered for r in results) / seconds,
        "errors": sum(r.errors for r in results),
        "p50_ms": float(np.percentile(lat, 50) * 1000) if lat.size else float("nan"),
        "p99_ms": float(np.percentile(lat, 99) * 1000) if lat.size else float("nan"),
        "answered": answered,
        "client_cpu_us": sum(r.cpu_s for r in results) / answered * 1e6 if answered else float("nan"),
    }


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by a process and its descendants (every thread's time on a CPU, in ns, from
    schedstat: exact, where the tick-sampled user + system times misjudge a process that wakes on timers):
    what a server spent, whatever else shares the machine."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parent[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            threads = os.listdir(f"/proc/{p}/task")
        except OSError:
            threads = []
        for t in threads:
            try:
                total += int(Path(f"/proc/{p}/task/{t}/schedstat").read_text().split()[0]) / 1e9
            except OSError:
                continue
        todo.extend(c for c, pp in parent.items() if pp == p)
    return total


def measured(server_pid: int, loads: list[Load]) -> dict[str, Any]:
    """`drive`, plus the server's CPU time per answer (over warm-up and measurement alike)."""
    before = tree_cpu_s(server_pid)
    r = drive(loads)
    cpu = tree_cpu_s(server_pid) - before
    answered = r.pop("answered")
    r["server_cpu_us"] = cpu / answered * 1e6 if answered else float("nan")
    return r


def split(n: int, parts: int) -> list[int]:
    """n coroutines over at most `parts` processes, as evenly as they go."""
    parts = max(1, min(parts, n))
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def unary_point(
    pid: int, address: str, method: str, payloads: list[bytes], concurrency: int, a: argparse.Namespace
) -> dict[str, Any]:
    loads = [
        Load(address, method, payloads, c, a.seconds, a.warmup, a.channels) for c in split(concurrency, a.client_procs)
    ]
    return {"concurrency": concurrency, **measured(pid, loads)}


def observe_point(
    pid: int, address: str, method: str, ids: list[str], rows: bytes, concurrency: int, a: argparse.Namespace
) -> dict[str, Any]:
    """Unary Observe: `concurrency` closed loops, each stepping a session of its own (one row a call)."""
    loads, first = [], 0
    for c in split(concurrency, a.client_procs):
        mine = ids[first : first + c]
        first += c
        loads.append(Load(address, method, [], c, a.seconds, a.warmup, a.channels, rows=rows, stepping=mine))
    return {"concurrency": concurrency, **measured(pid, loads)}


def stream_point(pid: int, address: str, method: str, ids: list[str], rows: bytes, a: argparse.Namespace) -> Any:
    per_stream = [ids[k :: a.streams] for k in range(a.streams)]
    loads = []
    first = 0
    for n in split(a.streams, a.client_procs):
        mine = per_stream[first : first + n]
        first += n
        loads.append(Load(address, method, [], n, a.seconds, a.warmup, a.channels, mine, rows))
    return {"streams": a.streams, "sessions": len(ids), **measured(pid, loads)}


H2LOAD_RE = {
    "requests": re.compile(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored"
    ),
    "data": re.compile(r"traffic: .*? \((\d+)\) data"),
}


@dataclass
class H2Run:
    """One h2load run's counts: requests done, answers whose bytes were as expected, what failed."""

    done: int
    good: int
    errors: int
    latencies_s: list[float]


def h2load_run(h2load: str, url: str, body: Path, answer_len: int, conns: int, streams: int, seconds: float) -> H2Run:
    """`h2load` posting `body` (one gRPC-framed request) for `seconds` over `conns` connections of `streams`
    streams each. gRPC answers an error with HTTP 200 and the status in the trailers, which h2load does not
    read: an answer is counted good by its size instead. Every good answer carries exactly one message of
    `answer_len` bytes (5 bytes of gRPC framing before it); an error carries none. So the data received is
    good * (5 + answer_len) and any request short of it is an error."""
    with tempfile.NamedTemporaryFile(prefix="h2load-", suffix=".log") as log:
        cmd = [h2load, "-c", str(conns), "-m", str(streams), "-D", f"{round(seconds * 1000)}ms", "-d", str(body)]
        cmd += ["-H", "content-type: application/grpc", "-H", "te: trailers", "--log-file", log.name, url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
        lines = Path(log.name).read_text().splitlines()
    req, data = H2LOAD_RE["requests"].search(done.stdout), H2LOAD_RE["data"].search(done.stdout)
    if done.returncode != 0 or req is None or data is None:
        raise RuntimeError(f"h2load failed ({done.returncode}): {done.stdout[-1000:]} {done.stderr[-1000:]}")
    n_done, ok_http = int(req.group(3)), int(req.group(4))
    good = good_answers(ok_http, int(data.group(1)), 5 + answer_len)
    # the log: start time (us since the epoch), HTTP status, duration (us); one line a request done
    lat = [int(f[2]) / 1e6 for f in (ln.split() for ln in lines) if len(f) == 3 and f[1] == "200"]
    return H2Run(n_done, good, n_done - good, lat if good == n_done else [])


def good_answers(ok_http: int, data: int, per: int) -> int:
    """How many of `ok_http` answers carried one message of `per` bytes (framing included), from the `data`
    bytes received in all: the rest carried none (a gRPC error). Data that is not a whole number of such
    messages means some answer was of another size, and then none is counted good. Nor when the data is a
    whole number of messages of another size for every answer: that total can also divide into fewer of the
    expected size (1,428 answers of 118 bytes are 1,416 of 119), so it is read as what it also is, every
    answer the wrong size (a run with real errors whose total happens to divide so is counted all bad:
    never a wrong answer counted good)."""
    good = min(ok_http, data // per)
    if data != good * per:
        return 0
    if good < ok_http and data and data % ok_http == 0:
        return 0
    return good


NAN = float("nan")
FAILED = {"per_s": 0.0, "p50_ms": NAN, "p99_ms": NAN, "client_cpu_us": NAN, "server_cpu_us": NAN}  # no figures


def h2load_point(
    h2load: str, pid: int, address: str, method: str, payload: bytes, concurrency: int, a: argparse.Namespace
) -> dict[str, Any]:
    """One unary point driven by h2load: a warm-up run, then the measured run, each checked (see
    `h2load_run`); the answer's expected size is what one grpc call with the same bytes answered now."""
    try:
        with grpc.insecure_channel(address) as ch:
            answer_len = len(ch.unary_unary(method)(payload, timeout=60))
    except grpc.RpcError as e:  # the server is gone or refuses this request: a point with no figures
        return {"concurrency": concurrency, **FAILED, "errors": 1, "failed": f"{e.code()}: {e.details()}"}
    conns = max(1, min(a.connections, concurrency))
    streams = -(-concurrency // conns)
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        body = Path(tmp) / "request.grpc"
        body.write_bytes(b"\0" + len(payload).to_bytes(4, "big") + payload)
        url = f"http://{address}{method}"
        usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu0 = tree_cpu_s(pid)
        try:
            warm = h2load_run(h2load, url, body, answer_len, conns, streams, a.warmup) if a.warmup > 0 else None
            run = h2load_run(h2load, url, body, answer_len, conns, streams, a.seconds)
        except RuntimeError as e:
            return {"concurrency": concurrency, **FAILED, "errors": 1, "failed": str(e)[-500:]}
        server_cpu = tree_cpu_s(pid) - cpu0
        usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime
    answered = run.good + (warm.good if warm else 0)
    lat = np.asarray(run.latencies_s)
    return {
        "concurrency": conns * streams,
        "per_s": run.good / a.seconds,
        "errors": run.errors + (warm.errors if warm else 0),
        "p50_ms": float(np.percentile(lat, 50) * 1000) if lat.size else float("nan"),
        "p99_ms": float(np.percentile(lat, 99) * 1000) if lat.size else float("nan"),
        "client_cpu_us": client_cpu / answered * 1e6 if answered else float("nan"),
        "server_cpu_us": server_cpu / answered * 1e6 if answered else float("nan"),
        "connections": conns,
    }


PYTHON_CLIENT = "python: benchmarks/bytes_client.py, grpc.aio closed loops"


def unary_client(a: argparse.Namespace) -> tuple[str | None, str]:
    """h2load's path when `--client h2load` (installed when missing), and the client's description."""
    if a.client == "python":
        return None, f"{PYTHON_CLIENT}, {a.client_procs} processes"
    try:
        path = ensure_installed("h2load", "nghttp2-client")
    except UserError as e:
        print(f"  h2load unavailable ({e}): the Python client drives the unary points", flush=True)
        return None, f"{PYTHON_CLIENT}, {a.client_procs} processes (h2load unavailable: {e})"
    return path, f"h2load: one process, {a.connections} connections at most, the rest as streams per connection"


# --- the servers ---------------------------------------------------------------------------------------


def _listening(proc: subprocess.Popen[str], pattern: str, what: str, timeout: float = 300) -> int:
    """Reads the child's output until `pattern` names its port; keeps draining it afterwards."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if m := re.search(pattern, line):
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return int(m.group(1))
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"{what} did not start (exit code {proc.wait()}):\n{''.join(lines[-30:])}")


def start_echo(unary: bytes, bidi: bytes, loop: str = "auto") -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, "-m", "benchmarks.echo_server", f"--unary-hex={unary.hex()}", f"--bidi-hex={bidi.hex()}"]
    cmd.append(f"--loop={loop}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    return proc, _listening(proc, r"listening on (\d+)", "the echo server")


def triton_python(cache: Path = CACHE) -> Path:
    """The Triton peer's own virtual environment (PyTriton pins protobuf < 7), created when missing.

    Triton's Python-backend stub embeds the system's libpython (/lib/.../libpython3.X.so): the venv is made
    from the system interpreter of that version, or the stub runs one patch release's C core under another
    release's standard library (it fails in multiprocessing). GATECAST_BENCH_TRITON_BASE overrides."""
    venv = cache / "triton-venv"
    python = venv / "bin" / "python"
    ok = python.exists() and subprocess.run([python, "-c", "import pytriton, onnxruntime"], check=False).returncode == 0
    if not ok:
        system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
        base = os.environ.get("GATECAST_BENCH_TRITON_BASE") or (str(system) if system.exists() else sys.executable)
        subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "nvidia-pytriton", "onnxruntime"], check=True)
    return python


def start_triton(python: Path, folder: Path, window: Path, request_file: Path) -> tuple[subprocess.Popen[str], int]:
    ports = [str(free_port()) for _ in range(3)]
    cmd = [str(python), str(ROOT / "benchmarks" / "triton_peer.py"), str(folder), str(window), str(request_file)]
    proc = subprocess.Popen(
        [*cmd, *ports], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True
    )
    return proc, _listening(proc, r"triton listening on (\d+)", "the Triton peer")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def open_sessions(address: str, model: str, n: int) -> list[str]:
    with grpc.insecure_channel(address) as ch:
        open_ = ch.unary_unary(
            "/gatecast.v1.Forecaster/OpenSession",
            request_serializer=pb.OpenSessionRequest.SerializeToString,
            response_deserializer=pb.OpenSessionResponse.FromString,
        )
        return [open_(pb.OpenSessionRequest(model=model), timeout=30).session_id for _ in range(n)]


def answers(address: str, request: bytes, row: bytes, session_id: str) -> tuple[bytes, bytes]:
    """gatecast's answers to a Forecast and to one Stream message: what the echo answers."""
    with grpc.insecure_channel(address) as ch:
        unary = ch.unary_unary(FORECAST)(request, timeout=30)
        stream = ch.stream_stream(STREAM)(iter([observe_bytes(session_id, 1, row)]), timeout=30)
        return unary, next(iter(stream))


# --- the run -------------------------------------------------------------------------------------------


def run(a: argparse.Namespace) -> dict[str, Any]:
    repo = a.repo or bench_repo()
    folder = max((p for p in (repo / a.model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    m = Manifest.read(folder)
    values = np.loadtxt(DATA, delimiter=",", skiprows=1, usecols=1, dtype=np.float32)[:, None]
    ctx = m.context_length
    windows = [values[i : i + ctx] for i in range(0, len(values) - ctx, 37)][:64]
    forecast = [
        pb.ForecastRequest(
            model=a.model, series=[pb.Matrix(rows=ctx, cols=1, values=w.ravel().tolist())]
        ).SerializeToString()
        for w in windows
    ]
    row = pb.Matrix(rows=1, cols=1, values=[float(values[0, 0])]).SerializeToString()
    stepped = 2 * sum(a.observe) + 1  # the Observe points' sessions (opened for the echo's points too)
    env = {"GATECAST_MAX_SESSIONS": str(a.sessions + stepped + 10), "GATECAST_MAX_QUEUE_SIZE": str(a.sessions + 1024)}
    env["GATECAST_EVENT_LOOP"] = a.loop
    h2load, client = unary_client(a)
    result: dict[str, Any] = {
        "model": f"{m.name} ({m.cell} {m.layers}x{m.hidden_size}, window {ctx}, horizon {m.horizon}, {m.input_form})",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores; client ({a.client_procs} processes) and server "
        "share them",
        "seconds_per_point": a.seconds,
        "warmup_s": a.warmup,
        "concurrency": a.concurrency,
        "client": {"unary": client, "stream": PYTHON_CLIENT},
        "event_loop": loops.resolve(a.loop),  # gatecast's and the echo's
        "servers": {},
    }
    servers: dict[str, Any] = result["servers"]
    with contextlib.ExitStack() as stack:
        gproc, gport = start_server(repo, env)
        stack.callback(stop, gproc)  # type: ignore[arg-type]
        gaddr = f"127.0.0.1:{gport}"
        ids = open_sessions(gaddr, a.model, a.sessions)
        unary_answer, bidi_answer = answers(gaddr, forecast[0], row, ids[0])
        result["payload_bytes"] = {"forecast_request": len(forecast[0]), "forecast_answer": len(unary_answer)}
        sizes = {"stream_message": len(observe_bytes(ids[0], 1, row)), "stream_answer": len(bidi_answer)}
        result["payload_bytes"] |= sizes
        peers = []
        if "gatecast" in a.servers:
            peers.append(Peer("gatecast", gproc.pid, gaddr, FORECAST, forecast, STREAM))
        if "kserve" in a.servers:  # gatecast's KServe front: the protocol Triton's peer is driven with
            peers.append(
                Peer("kserve", gproc.pid, gaddr, TRITON_INFER, kserve_requests(a.model, m.onnx.input, windows))
            )
        if "echo" in a.servers:
            eproc, eport = start_echo(unary_answer, bidi_answer, a.loop)
            stack.callback(stop, eproc)
            peers.append(Peer("echo", eproc.pid, f"127.0.0.1:{eport}", ECHO_UNARY, forecast, ECHO_BIDI))
        if "triton" in a.servers:
            triton = start_triton_peer(stack, folder, np.stack(windows))
            if isinstance(triton, str):
                servers["triton"] = {"unavailable": triton}
            else:
                peers.append(triton)
        for p in peers:
            servers[p.name] = {"unary": []}
        result["model_cpu"] = [model_cpu(folder, ctx, a.model_seconds)]
        for c in a.concurrency:  # point by point, so that every server meets the same background load
            for p in peers:
                if h2load:
                    point = h2load_point(h2load, p.pid, p.address, p.method, p.payloads[0], c, a)
                else:
                    point = unary_point(p.pid, p.address, p.method, p.payloads, c, a)
                servers[p.name]["unary"].append(point)
                _progress(p.name, servers[p.name]["unary"][-1])
        result["model_cpu"].append(model_cpu(folder, ctx, a.model_seconds))  # again: the two bracket the points
        # streaming: the echo before and after the others, its figure the mean of the two, so that a drift of
        # the machine's speed while the points run (up to 1.5x within minutes here) does not fall on one side
        streaming = [p for p in peers if p.stream]
        echo = next((p for p in streaming if p.name == "echo"), None)
        order = [echo, *(p for p in streaming if p is not echo), echo] if echo and len(streaming) > 1 else streaming
        for p in order:
            assert p is not None and p.stream is not None
            point = stream_point(p.pid, p.address, p.stream, ids, row, a)
            servers[p.name].setdefault("stream_runs", []).append(point)
            _progress(p.name, point)
        for s in servers.values():
            if runs := s.pop("stream_runs", None):
                s["stream"] = runs[0] if len(runs) == 1 else _mean_point(runs)
        if a.observe and "gatecast" in a.servers:
            observe_points(stack, result, gproc.pid, gaddr, a, row)
    ratios(result)
    reach(result)
    return result


def observe_points(
    stack: contextlib.ExitStack, result: dict[str, Any], pid: int, address: str, a: argparse.Namespace, row: bytes
) -> None:
    """Unary Observe against gatecast, and the same client against an echo that answers with gatecast's own
    Observe answer (started for these points): fresh sessions for each point (their next sequence is 1)."""
    servers = result["servers"]
    probe = open_sessions(address, a.model, 1)[0]
    with grpc.insecure_channel(address) as ch:
        answer = ch.unary_unary(OBSERVE)(observe_bytes(probe, 1, row), timeout=30)
    result["payload_bytes"] |= {"observe_request": len(observe_bytes(probe, 1, row)), "observe_answer": len(answer)}
    eproc, eport = start_echo(answer, answer, a.loop)
    stack.callback(stop, eproc)
    for c in a.observe:
        for name, p, addr, method in (
            ("echo", eproc.pid, f"127.0.0.1:{eport}", ECHO_UNARY),
            ("gatecast", pid, address, OBSERVE),
        ):
            ids = open_sessions(address, a.model, c)  # the echo ignores them; gatecast steps them from 1
            point = observe_point(p, addr, method, ids, row, c, a)
            servers.setdefault(name, {}).setdefault("observe", []).append(point)
            _progress(name, point)


def model_cpu(folder: Path, window: int, seconds: float) -> dict[str, Any]:
    """The graph's own CPU per window, in process on one thread (the servers' setting), at MODEL_BATCHES; the
    least of them is what any server must spend on a window at best."""
    runs = [ort_ceiling(folder, b, window, seconds) for b in MODEL_BATCHES]
    per_batch = {str(r["batch"]): r["cpu_us_per_item"] for r in runs}
    return {"cpu_us_per_window": min(per_batch.values()), "by_batch": per_batch}


def reach(result: dict[str, Any]) -> None:
    """At each concurrency, the most req/s that a server on grpc.aio could answer on this machine: one that
    spends per call no more than the echo (the same payloads, nothing else) plus the graph's least CPU per
    window, with every core busy, the client's CPU (the echo's client) taken out. Beside it, twice Triton's
    req/s (issue 9's target), so that a run says whether the target is within what the machine can do."""
    servers, cpu = result["servers"], result.get("model_cpu")
    echo = servers.get("echo")
    if not echo or not cpu:
        return
    model_us = float(np.mean([c["cpu_us_per_window"] for c in cpu]))
    triton = {r["concurrency"]: r["per_s"] for r in servers.get("triton", {}).get("unary", [])}
    cores = os.cpu_count() or 1
    rows = []
    for r in echo.get("unary", []):
        per_call = r["server_cpu_us"] + model_us + r["client_cpu_us"]
        row = {
            "concurrency": r["concurrency"],
            "echo_server_cpu_us": r["server_cpu_us"],
            "client_cpu_us": r["client_cpu_us"],
            "model_cpu_us": model_us,
            "per_s": cores * 1e6 / per_call,
        }
        if t := triton.get(r["concurrency"]):
            row["two_x_triton_per_s"] = 2 * t
            row["two_x_triton_within_reach"] = 2 * t <= row["per_s"]
        rows.append(row)
    result["reach"] = rows


def kserve_requests(model: str, input_name: str, windows: list[np.ndarray]) -> list[bytes]:
    """ModelInferRequests for gatecast's KServe front, one window each (FP32 [1, time, 1], raw contents)."""
    from gatecast.inference import grpc_predict_v2_pb2 as kpb

    out = []
    for w in windows:
        x = kpb.ModelInferRequest.InferInputTensor(name=input_name, datatype="FP32", shape=[1, len(w), 1])
        req = kpb.ModelInferRequest(model_name=model, inputs=[x], raw_input_contents=[w.astype("<f4").tobytes()])
        out.append(req.SerializeToString())
    return out


@dataclass
class Peer:
    """A server under test: where it listens, what to call, and what to send."""

    name: str
    pid: int
    address: str
    method: str
    payloads: list[bytes]
    stream: str | None = None  # the bidirectional method, where the server has one to compare


def start_triton_peer(stack: contextlib.ExitStack, folder: Path, windows: np.ndarray) -> Peer | str:
    """Triton serving the graph (stopped when `stack` closes), or why it cannot (never made-up figures)."""
    try:
        python = triton_python()
    except (subprocess.CalledProcessError, OSError) as e:
        return f"PyTriton could not be installed: {e}"
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="triton-")))
    window, request_file = tmp / "windows.npy", tmp / "requests.bin"
    np.save(window, windows)
    failure = ""
    for attempt in range(TRITON_ATTEMPTS):
        try:
            proc, port = start_triton(python, folder, window, request_file)
            break
        except RuntimeError as e:  # on a busy machine an instance may miss PyTriton's 1 s handshake
            print(f"  the Triton peer did not start (attempt {attempt + 1})", flush=True)
            failure = str(e)[-2000:]
    else:
        return failure
    stack.callback(stop_group, proc)
    blob = request_file.read_bytes()
    payloads, pos = [], 0
    while pos < len(blob):  # length-prefixed ModelInferRequest bytes, one per window
        n = int.from_bytes(blob[pos : pos + 4], "little")
        payloads.append(blob[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return Peer("triton", proc.pid, f"127.0.0.1:{port}", TRITON_INFER, payloads)


def stop_group(proc: subprocess.Popen[str]) -> None:
    """The Triton peer and its children (tritonserver, the Python-backend stubs)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _mean_point(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Points of one server taken at different times as one: each rate, time and CPU figure the mean, each
    count (errors, answers) the sum, the settings (streams, sessions) as they were; the runs kept."""
    merged: dict[str, Any] = {**runs[0], "runs": runs}
    for k, v in runs[0].items():
        values = [r[k] for r in runs]
        if isinstance(v, float):
            merged[k] = float(np.mean(values))
        elif isinstance(v, int) and not isinstance(v, bool) and k not in ("streams", "sessions"):
            merged[k] = sum(values)
    return merged


def ratios(result: dict[str, Any]) -> None:
    """Each server's req/s as a share of the echo's at the same concurrency (and streaming)."""
    servers = result["servers"]
    echo = servers.get("echo")
    if echo:
        ceiling = {r["concurrency"]: r["per_s"] for r in echo.get("unary", [])}
        for s in servers.values():
            for r in s.get("unary", []):
                r["of_echo"] = r["per_s"] / ceiling[r["concurrency"]] if ceiling.get(r["concurrency"]) else None
            if "stream" in s and "stream" in echo:
                s["stream"]["of_echo"] = s["stream"]["per_s"] / echo["stream"]["per_s"]
        observed = {r["concurrency"]: r["per_s"] for r in echo.get("observe", [])}
        for s in servers.values():
            for r in s.get("observe", []):
                r["of_echo"] = r["per_s"] / observed[r["concurrency"]] if observed.get(r["concurrency"]) else None
    t = servers.get("triton")
    if t and "unary" in t:
        tri = {r["concurrency"]: r for r in t["unary"]}
        for g in (servers.get("gatecast"), servers.get("kserve")):
            for r in g["unary"] if g else []:
                if (o := tri.get(r["concurrency"])) and o["per_s"]:
                    r["of_triton"] = r["per_s"] / o["per_s"]


def _progress(name: str, row: dict[str, Any]) -> None:
    print(
        f"  {name:>8} {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})}", flush=True
    )


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['model']} | {result['machine']}")
    clients = result.get("client", {})
    print(f"\nunary, one series per request ({result['seconds_per_point']} s per point; {clients.get('unary', '')})")
    head = f"{'server':>10}{'conc.':>7}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'of echo':>9}{'x Triton':>9}"
    print(f"{head}{'srv us':>8}{'cli us':>8}{'errors':>8}")
    for name, s in result["servers"].items():
        if "unavailable" in s:
            print(f"{name:>10}  unavailable: {s['unavailable'].splitlines()[0][:200]}")
        for r in s.get("unary", []):
            share = f"{r['of_echo']:.2f}" if r.get("of_echo") is not None else "-"
            times = f"{r['of_triton']:.2f}" if r.get("of_triton") is not None else "-"
            print(
                f"{name:>10}{r['concurrency']:>7}{r['per_s']:>9.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{share:>9}"
                f"{times:>9}{r['server_cpu_us']:>8.0f}{r.get('client_cpu_us', float('nan')):>8.0f}{r['errors']:>8}"
            )
    print(f"\nstreaming, one row per message ({clients.get('stream', '')})")
    head = f"{'server':>10}{'streams':>9}{'sessions':>9}{'steps/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'of echo':>9}"
    print(f"{head}{'srv us':>8}{'cli us':>8}{'errors':>8}")
    for name, s in result["servers"].items():
        if r := s.get("stream"):
            share = f"{r['of_echo']:.2f}" if r.get("of_echo") is not None else "-"
            print(
                f"{name:>10}{r['streams']:>9}{r['sessions']:>9}{r['per_s']:>9.0f}{r['p50_ms']:>9.2f}"
                f"{r['p99_ms']:>9.2f}{share:>9}{r['server_cpu_us']:>8.0f}{r.get('client_cpu_us', float('nan')):>8.0f}"
                f"{r['errors']:>8}"
            )
    if any("observe" in s for s in result["servers"].values()):
        print("\nunary Observe, one row a call, each loop stepping a session of its own (python client)")
        head = f"{'server':>10}{'conc.':>7}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'of echo':>9}"
        print(f"{head}{'srv us':>8}{'cli us':>8}{'errors':>8}")
        for name, s in result["servers"].items():
            for r in s.get("observe", []):
                share = f"{r['of_echo']:.2f}" if r.get("of_echo") is not None else "-"
                print(
                    f"{name:>10}{r['concurrency']:>7}{r['per_s']:>9.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{share:>9}"
                    f"{r['server_cpu_us']:>8.0f}{r.get('client_cpu_us', float('nan')):>8.0f}{r['errors']:>8}"
                )
    print("srv us, cli us: CPU time per answer (per step) of the server and of the client, warm-up included")
    if rows := result.get("reach"):
        print(
            f"\nreach: the most req/s a server on grpc.aio could answer here (the echo's CPU per call plus the "
            f"graph's {rows[0]['model_cpu_us']:.0f} us per window, every core busy), beside twice Triton's"
        )
        print(f"{'conc.':>7}{'echo srv us':>13}{'cli us':>8}{'model us':>10}{'reach/s':>9}{'2x Triton':>11}")
        for r in rows:
            two = f"{r['two_x_triton_per_s']:.0f}" if "two_x_triton_per_s" in r else "-"
            print(
                f"{r['concurrency']:>7}{r['echo_server_cpu_us']:>13.0f}{r['client_cpu_us']:>8.0f}"
                f"{r['model_cpu_us']:>10.0f}{r['per_s']:>9.0f}{two:>11}"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--servers",
        nargs="+",
        default=["echo", "triton", "gatecast", "kserve"],
        choices=["echo", "triton", "gatecast", "kserve"],
        help="kserve: gatecast's KServe v2 front (ModelInfer, the protocol the Triton peer is driven with)",
    )
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    ap.add_argument(
        "--loop",
        choices=loops.LOOP_CHOICES,
        default="auto",
        help="the event loop of gatecast (GATECAST_EVENT_LOOP) and of the echo server alike",
    )
    ap.add_argument("--seconds", type=float, default=8.0, help="measured seconds per point")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds run before measuring, per point")
    ap.add_argument(
        "--client",
        choices=["h2load", "python"],
        default="h2load",
        help="what drives the unary points (streaming always uses the Python client); see the docstring",
    )
    ap.add_argument("--connections", type=int, default=2, help="h2load: connections (concurrency split over them)")
    ap.add_argument("--client-procs", type=int, default=2, help="client processes (coroutines split over them)")
    ap.add_argument("--channels", type=int, default=4, help="gRPC channels per client process")
    ap.add_argument(
        "--observe",
        type=int,
        nargs="*",
        default=[8, 64],
        help="unary Observe points (Python client): loops in flight, each stepping a session of its own; none: off",
    )
    ap.add_argument("--streams", type=int, default=16, help="streams (bidirectional calls)")
    ap.add_argument("--sessions", type=int, default=512, help="sessions, spread over the streams")
    ap.add_argument(
        "--model-seconds", type=float, default=1.0, help="seconds per batch measuring the graph's own CPU per window"
    )
    ap.add_argument("--quick", action="store_true", help="a smoke test: short points, few concurrencies")
    ap.add_argument("--repo", type=Path, help="serve this repository instead of the trained benchmark model")
    ap.add_argument("--model", default=MODEL, help="the model of --repo to drive (one feature)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "throughput.json")
    a = ap.parse_args(argv)
    if a.quick:
        a.seconds, a.warmup, a.concurrency, a.streams, a.sessions, a.client_procs = 0.5, 0.2, [8], 2, 8, 1
        a.observe = [4] if a.observe else []
        a.model_seconds = 0.1
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    result = run(a)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwrote {a.out}")
    return result


if __name__ == "__main__":
    main()

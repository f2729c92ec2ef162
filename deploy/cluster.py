"""`make cluster`: three `gatecast serve` replicas over one model repository, Redis (the shared session store)
and HAProxy (deploy/haproxy.cfg) on loopback, no containers. Prints the endpoint; Ctrl-C stops them all.

    python -m deploy.cluster [--port 8500] [--repo models] [--no-store]

Each replica binds port 0 and its port is read back from its log line; the proxy's config takes the
addresses from the environment. haproxy and redis-server are installed from Debian's packages when missing
(as root). Tests and benchmarks drive the same `Cluster`: kill a replica, add the fourth to the ring.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deploy.packages import ensure_installed
from gatecast.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "haproxy.cfg"
SLOTS = ("r1", "r2", "r3", "r4")  # the config's servers: r4 is the spare slot, off until `add_replica`
UNUSED = "127.0.0.1:1"  # the spare slot's address until a replica fills it
PROXY_VARIABLES = ("GATECAST_PROXY_", "GATECAST_REPLICA_")  # deploy/haproxy.cfg's, not server settings
LISTENING = re.compile(r"gatecast listening on \S+:(\d+) \(metrics on (\S+)\)")


def store_supported() -> bool:
    """Whether the server has the shared session store (settings session_store_*)."""
    from gatecast.service.settings import Settings

    return "session_store_url" in Settings.model_fields


@dataclass
class Replica:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class Cluster:
    """Replicas r1-r3 (r4 when added), Redis on a unix socket (with `store`) and HAProxy bound to `bind`:
    host:port, or a path for a unix socket (what tests use: no port to pick)."""

    def __init__(
        self,
        repo: Path,
        bind: str = "127.0.0.1:8500",
        *,
        store: bool = True,
        workdir: Path | None = None,
        serve_args: tuple[str, ...] = (),
        store_settings: dict[str, str] | None = None,
    ) -> None:
        self.repo = repo
        self.bind = bind
        self.store = store and store_supported()
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="gatecast-cluster-"))
        self.serve_args = serve_args
        self.store_settings = store_settings or {}
        self.replicas: dict[str, Replica] = {}
        self._processes: list[subprocess.Popen[bytes]] = []
        self.redis: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None
        self.admin_socket = self.dir / "admin.sock"
        self.redis_socket = self.dir / "redis.sock"

    @property
    def target(self) -> str:
        """What a gRPC client dials."""
        return self.bind if ":" in self.bind else f"unix:{self.bind}"

    @property
    def store_url(self) -> str:
        return f"unix://{self.redis_socket}"

    def start(self) -> Cluster:
        if self._processes:
            raise RuntimeError("this cluster is started already")
        haproxy = ensure_installed("haproxy", "haproxy")
        try:
            if self.store:
                redis = ensure_installed("redis-server", "redis-server")
                args = ["--port", "0", "--unixsocket", str(self.redis_socket), "--unixsocketperm", "700"]
                args += ["--save", "", "--appendonly", "no", "--dir", str(self.dir)]
                self.redis = self._spawn([redis, *args], "redis")
                _wait(
                    self.redis_socket.exists, 10, "redis-server did not open its socket", self.redis, self._log("redis")
                )
            starting = [self._spawn_replica(name) for name in SLOTS[:3]]
            for name, process in starting:
                self._await_replica(name, process)
            env = {
                **os.environ,
                "GATECAST_PROXY_BIND": self.bind,
                "GATECAST_PROXY_ADMIN": str(self.admin_socket),
                **{f"GATECAST_REPLICA_{i}": self._address(name) for i, name in enumerate(SLOTS, 1)},
            }
            self.proxy = self._spawn([haproxy, "-db", "-f", str(CONFIG)], "haproxy", env)
            up = set(SLOTS[:3])
            _wait(lambda: self.up() >= up, 15, "haproxy did not see the replicas up", self.proxy, self._log("haproxy"))
        except BaseException:
            self.stop()
            raise
        return self

    def _address(self, name: str) -> str:
        return self.replicas[name].address if name in self.replicas else UNUSED

    def _log(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def _spawn(self, args: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with self._log(name).open("wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._processes.append(process)  # stopped by `stop`, whether or not it started well
        return process

    def _spawn_replica(self, name: str) -> tuple[str, subprocess.Popen[bytes]]:
        gatecast = str(Path(sys.executable).with_name("gatecast"))
        args = [gatecast, "serve", "--repo", str(self.repo), "--host", "127.0.0.1", "--port", "0"]
        args += ["--metrics-port", "0", *self.serve_args]
        env = {k: v for k, v in os.environ.items() if not k.startswith(PROXY_VARIABLES)}  # GATECAST_* settings pass
        if self.store:
            env["GATECAST_SESSION_STORE_URL"] = self.store_url
            env.update({f"GATECAST_{k.upper()}": v for k, v in self.store_settings.items()})
        return name, self._spawn(args, name, env)

    def _await_replica(self, name: str, process: subprocess.Popen[bytes]) -> Replica:
        log = self._log(name)

        def listening() -> re.Match[str] | None:
            return LISTENING.search(log.read_text(errors="replace"))

        _wait(listening, 60, f"replica {name} did not start", process, log)
        found = listening()
        assert found is not None
        replica = Replica(name, process, int(found[1]), int(found[2]), log)
        self.replicas[name] = replica
        return replica

    # --- while running -----------------------------------------------------------------------------------

    def admin(self, command: str) -> str:
        """One command on HAProxy's admin socket (its runtime API), and the answer."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.admin_socket))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def up(self) -> set[str]:
        """The replicas on the session ring now (operational state 2: running)."""
        if not self.admin_socket.exists():
            return set()
        try:
            lines = self.admin("show servers state sessions").splitlines()
        except OSError:
            return set()
        rows = [line.split() for line in lines[2:] if line.strip()]
        return {row[3] for row in rows if len(row) > 5 and row[5] == "2"}

    def kill(self, name: str) -> None:
        """SIGKILL: no drain, no goodbye, sessions in memory lost."""
        replica = self.replicas.pop(name)
        replica.process.kill()
        replica.process.wait(10)
        _wait(lambda: name not in self.up(), 10, f"haproxy still routes to {name}", self.proxy, self._log("haproxy"))

    def add_replica(self, name: str = "r4") -> Replica:
        """Starts a replica in a spare slot and puts it on the ring without a reload."""
        replica = self._await_replica(*self._spawn_replica(name))
        for backend in ("sessions", "oneshot"):
            self.admin(f"set server {backend}/{name} addr 127.0.0.1 port {replica.port}")
            self.admin(f"set server {backend}/{name} state ready")
        _wait(lambda: name in self.up(), 15, f"haproxy did not take {name} up", self.proxy, self._log("haproxy"))
        return replica

    def stop(self) -> None:
        processes, self._processes = self._processes, []
        for p in processes:
            if p.poll() is None:
                p.terminate()
        for p in processes:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.replicas.clear()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait(
    ready: Callable[[], object], timeout: float, what: str, process: subprocess.Popen[bytes] | None, log: Path
) -> None:
    """Polls `ready()` until true; a process that exits meanwhile, or the timeout, is an error with its log."""
    deadline = time.monotonic() + timeout
    while not ready():
        if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
            raise UserError(f"{what} within {timeout:.0f} s (log {log}: {' | '.join(tail)})")
        time.sleep(0.05)


def _check_free(port: int) -> None:
    """HAProxy and grpc both bind with SO_REUSEPORT: a server already on the port would silently share it."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise UserError(f"port {port} on 127.0.0.1: {e.strerror}; stop what listens there or give --port") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8500, help="the proxy's port on 127.0.0.1 (default 8500)")
    parser.add_argument("--repo", type=Path, default=ROOT / "models", help="the replicas' model repository")
    parser.add_argument("--no-store", action="store_true", help="no Redis: a session dies with its replica")
    args = parser.parse_args(argv)
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cluster = Cluster(args.repo, f"127.0.0.1:{args.port}", store=not args.no_store)
    try:
        _check_free(args.port)
        cluster.start()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        print(f"gatecast cluster on {cluster.target} (HAProxy: {CONFIG.relative_to(ROOT)})")
        for r in cluster.replicas.values():
            print(f"  {r.name}: {r.address}, metrics http://127.0.0.1:{r.metrics_port}/metrics, log {r.log}")
        store = f"Redis on {cluster.store_url}" if cluster.store else "no session store: sessions die with a replica"
        print(f"  {store}; admin socket {cluster.admin_socket}\nCtrl-C stops them all.", flush=True)
        processes = [cluster.proxy, *(r.process for r in cluster.replicas.values())]
        while not stop and all(p is not None and p.poll() is None for p in processes):
            time.sleep(0.2)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

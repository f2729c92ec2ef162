"""Deployment files read against the code they deploy: the Makefile's install levels (`make -n`, nothing
installed), docker-compose.yml and the Dockerfile against the server's settings (docker cannot run here: the
files are parsed), the images' dependency lock against pyproject.toml, and the container health check run
for real against the server."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from packaging.requirements import Requirement

from gatecast.service.settings import Settings
from tests.conftest import DEFAULT_MODEL, ROOT, RunningServer, server_settings
from tests.test_security import Pki, _issue, _key_pem, _pem

DEFAULTS = {name: field.default for name, field in Settings.model_fields.items()}
EXPORTER_PORTS = range(9100, 10000)  # Prometheus' allocated exporter range: 9100 is node_exporter
HEALTHCHECK = "gatecast.service.healthcheck"


# --- make run / make test: what each installs (make -n prints, runs nothing but the model check) ----------


def _make(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.fail("make is not installed: `make test` itself needs it")
    # run as a top-level make even under `make test` (a sub-make prints "Entering directory" lines)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    done = subprocess.run(
        ["make", "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, env=env
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture()
def repo_with_model(tmp_path: Path) -> Path:
    shutil.copytree(DEFAULT_MODEL, tmp_path / "repo" / "taylor")
    return tmp_path / "repo"


def test_make_run_with_the_model_present_installs_serving_only(tmp_path: Path, repo_with_model: Path) -> None:
    out = _make("run", f"VENV={tmp_path / 'venv'}", f"MODEL_REPO={repo_with_model}")
    assert "pip install --quiet -e .\n" in out  # the package without extras
    assert "[train" not in out and "torch" not in out and "gatecast train" not in out
    assert out.rstrip().endswith(f"gatecast serve --repo {repo_with_model}")


def test_make_run_with_an_empty_repository_installs_train_and_trains_first(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = _make("run", f"VENV={tmp_path / 'venv'}", f"MODEL_REPO={empty}")
    lines = out.splitlines()
    serve_install = lines.index(next(x for x in lines if x.endswith("pip install --quiet -e .")))
    train_install = lines.index(next(x for x in lines if x.endswith("pip install --quiet -e '.[train]'")))
    train = lines.index(next(x for x in lines if "gatecast train --config training/configs/taylor.toml" in x))
    serve = lines.index(next(x for x in lines if "gatecast serve" in x))
    assert serve_install < train_install < train < serve
    assert f"--repo {empty}" in lines[train]


def test_make_test_installs_every_extra_the_suite_needs(tmp_path: Path) -> None:
    out = _make("test", f"VENV={tmp_path / 'venv'}")
    assert "pip install --quiet -e '.[train,client,dev]'" in out
    assert out.index("-m venv") < out.index("[train,client,dev]") < out.index("bin/pytest -q")


def test_install_stamps_are_per_level_and_follow_pyproject(tmp_path: Path, repo_with_model: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()  # never run: make -n
    args = ("run", f"VENV={venv}", f"MODEL_REPO={repo_with_model}")
    assert "pip install" in _make(*args)  # nothing installed yet
    (venv / ".installed-serve").touch()
    assert "pip install" not in _make(*args)  # serving installed: run does not reinstall, nor install train
    assert "pip install --quiet -e .\n" in _make("-W", "pyproject.toml", *args)  # a dependency change reinstalls
    assert "[train,client,dev]" in _make("test", f"VENV={venv}")  # the serve stamp does not satisfy test


# --- docker-compose.yml ----------------------------------------------------------------------------------


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with VAR unset: the default; a bare ${VAR} or ${VAR:?err} fails the test."""

    def one(m: re.Match[str]) -> str:
        assert m.group(2) == ":-", f"{m.group(0)}: compose variables here need a default"
        return m.group(3)

    return re.sub(r"\$\{(\w+)(:-|:\?|-|\?)?([^}]*)\}", one, value)


def _ports(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) for each published port ("ip:host:container" or "host:container")."""
    out = []
    for spec in service.get("ports", []):
        parts = _interpolate(str(spec)).split(":")
        assert len(parts) in (2, 3), f"{spec}: publish with an explicit host port"
        ip = parts[0] if len(parts) == 3 else "0.0.0.0"
        out.append((ip, int(parts[-2]), int(parts[-1])))
    return out


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _gatecast_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = {name: s for name, s in compose["services"].items() if name.startswith("gatecast")}
    assert set(found) == {"gatecast", "gatecast-gpu"}
    return found


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.strip().startswith("#")]
    return [(x.split(None, 1)[0].upper(), x.split(None, 1)[1] if " " in x else "") for x in lines]


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in _dockerfile():
        if op == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", args))
    return env


def test_compose_publishes_the_settings_ports_and_no_exporter_port(compose: dict[str, Any]) -> None:
    for name, service in _gatecast_services(compose).items():
        ports = _ports(service)
        assert {c for _, _, c in ports} == {DEFAULTS["port"], DEFAULTS["metrics_port"]}, name
        metrics = next(p for p in ports if p[2] == DEFAULTS["metrics_port"])
        assert metrics[0] == "127.0.0.1", f"{name}: /metrics is for Prometheus on the compose network"
    published = [(name, p) for name, s in compose["services"].items() for p in _ports(s)]
    for name, (_, host, _) in published:
        assert host not in EXPORTER_PORTS, f"{name}: host port {host} is in the exporter range (9100: node_exporter)"
    assert 9100 not in {DEFAULTS["port"], DEFAULTS["metrics_port"]}


def test_prometheus_scrapes_the_metrics_port() -> None:
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert f"gatecast:{DEFAULTS['metrics_port']}" in targets


def test_compose_mounts_the_models_where_the_image_serves_them(compose: dict[str, Any]) -> None:
    repo = _image_env()["GATECAST_REPO"]
    for name, service in _gatecast_services(compose).items():
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts.get(repo) == "./models", f"{name}: ./models must be mounted at GATECAST_REPO={repo}"
        snapshot = Path(service["environment"]["GATECAST_SNAPSHOT_PATH"])
        assert str(snapshot.parent) in mounts, f"{name}: the session snapshot must be on a volume"


def test_compose_health_checks_restarts_and_dependencies(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), f"{name}: no restart policy"
        assert service.get("healthcheck", {}).get("test"), f"{name}: no health check"
        for dep, how in service.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy", f"{name} -> {dep}"
    for name, service in _gatecast_services(compose).items():
        assert HEALTHCHECK in " ".join(service["healthcheck"]["test"]), name
        grace = float(service["stop_grace_period"].removesuffix("s"))
        assert grace > DEFAULTS["shutdown_grace_s"], f"{name}: docker would kill the server mid-drain"
    assert compose["services"]["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_grafana_has_no_usable_default_admin_password(compose: dict[str, Any]) -> None:
    env = {k: str(v) for k, v in compose["services"]["grafana"]["environment"].items()}
    password = env.get("GF_SECURITY_ADMIN_PASSWORD")
    if password is not None:  # from the environment, never a default
        assert re.fullmatch(r"\$\{\w+(:?\?[^}]*)?\}", password), password
    else:  # anonymous viewers, and no way to log in as the built-in admin
        assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
        assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
        assert env["GF_AUTH_DISABLE_LOGIN_FORM"] == "true"
        assert env["GF_AUTH_BASIC_ENABLED"] == "false"


def test_the_gpu_reservation_is_in_its_own_profile(compose: dict[str, Any]) -> None:
    def reserves_gpu(service: dict[str, Any]) -> bool:
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        return any("gpu" in d.get("capabilities", []) for d in devices)

    gpu = {name for name, s in compose["services"].items() if reserves_gpu(s)}
    assert gpu == {"gatecast-gpu"}
    services = _gatecast_services(compose)
    assert services["gatecast-gpu"]["profiles"] == ["gpu"]
    assert services["gatecast-gpu"]["build"]["args"]["VARIANT"] == "cuda"
    assert services["gatecast"]["build"]["args"]["VARIANT"] == "cpu"
    # the CPU server is the default profile; the GPU one takes its place (and its name, for Prometheus)
    dotenv = dict(line.split("=", 1) for line in (ROOT / ".env").read_text().splitlines() if "=" in line)
    assert dotenv["COMPOSE_PROFILES"] in services["gatecast"]["profiles"]
    assert "gatecast" in services["gatecast-gpu"]["networks"]["default"]["aliases"]


def test_every_gatecast_variable_is_a_setting(compose: dict[str, Any]) -> None:
    names = set(_image_env())
    for service in compose["services"].values():
        names |= set(service.get("environment", {}))
    gatecast = {n for n in names if n.upper().startswith("GATECAST_")}
    assert gatecast >= {"GATECAST_HOST", "GATECAST_REPO", "GATECAST_SNAPSHOT_PATH"}
    unknown = {n for n in gatecast if n.removeprefix("GATECAST_").lower() not in Settings.model_fields}
    assert not unknown, f"the server refuses unknown GATECAST_* variables: {unknown}"
    # nor may a compose variable (read from the user's shell) be one
    text = (ROOT / "docker-compose.yml").read_text()
    assert not re.findall(r"\$\{GATECAST_", text)


# --- Dockerfile ------------------------------------------------------------------------------------------


def test_dockerfile_bases_are_pinned_and_variants_exist() -> None:
    ops = _dockerfile()
    stages = {m.group(1) for op, args in ops if op == "FROM" and (m := re.search(r"\bAS\s+(\S+)", args, re.I))}
    variants = {"cpu", "cuda"}
    assert variants <= stages
    for op, args in ops:
        if op == "FROM":
            image = args.split()[0]
            if image.startswith("${") or image in stages:
                continue
            assert re.search(r":\d+\.\d+\.\d+(-[\w.-]+)?(@sha256:[0-9a-f]{64})?$", image), f"{image}: not pinned"
        for m in re.finditer(r"--mount=from=([^,\s]+)", args):
            assert re.search(r":\d+\.\d+\.\d+$", m.group(1)), f"{m.group(1)}: not pinned"
    default = next(args for op, args in ops if op == "ARG" and args.startswith("VARIANT="))
    assert default == "VARIANT=cpu"
    for variant in variants:
        assert (ROOT / "requirements" / f"serve-{variant}.txt").is_file()


def test_dockerfile_installs_pinned_dependencies_before_the_source() -> None:
    ops = _dockerfile()
    runtime = ops[next(i for i, (op, args) in enumerate(ops) if op == "FROM" and "${VARIANT}" in args) :]
    installs = [i for i, (op, args) in enumerate(runtime) if op == "RUN" and "pip install" in args]
    source = [i for i, (op, args) in enumerate(runtime) if op == "COPY" and re.search(r"\b(service|gatecast)\b", args)]
    locked = [i for i in installs if "requirements/serve-${VARIANT}.txt" in runtime[i][1]]
    assert locked and source and locked[0] < min(source), "a code change would reinstall the dependencies"
    copies_before = [args for op, args in runtime[: locked[0]] if op == "COPY"]
    assert all("requirements/" in args for args in copies_before), copies_before
    for i in installs:
        assert "--no-cache-dir" in runtime[i][1], runtime[i][1]
    package = [i for i in installs if i > min(source)]
    assert package and all("--no-deps" in runtime[i][1] for i in package), "the package must not resolve again"


def test_dockerfile_runs_as_a_non_root_user_with_a_health_check() -> None:
    ops = _dockerfile()
    users = [args for op, args in ops if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ops.index(next(o for o in ops if o[0] == "USER")) > max(i for i, o in enumerate(ops) if o[0] == "RUN")
    health = " ".join(args for op, args in ops if op == "HEALTHCHECK")
    assert HEALTHCHECK in health
    exposed = {int(p) for op, args in ops if op == "EXPOSE" for p in args.split()}
    assert exposed == {DEFAULTS["port"], DEFAULTS["metrics_port"]}
    assert _image_env()["GATECAST_HOST"] == "0.0.0.0"


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    patterns = [x for x in (ROOT / ".dockerignore").read_text().splitlines() if x and not x.startswith("#")]
    assert patterns[0] == "*"  # everything else stays out of the context
    kept = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for op, args in _dockerfile():
        if op == "COPY" and not args.startswith("--from"):
            for src in args.split()[:-1]:
                src = src.replace("${VARIANT}", "*")
                assert any(Path(src).match(k) or src.startswith(k + "/") or src == k for k in kept), src


# --- the images' dependency lock -----------------------------------------------------------------------


def _key(spec: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(spec).name).lower()


def _lock(name: str) -> dict[str, str]:
    lines = (ROOT / "requirements" / name).read_text().splitlines()
    pins = [x for x in lines if x and not x.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9-]+==[\w.]+", p) for p in pins), pins
    return dict(p.split("==") for p in pins)


def test_the_lock_pins_every_serving_dependency_and_nothing_of_training() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    cuda, cpu = _lock("serve-cuda.txt"), _lock("serve-cpu.txt")
    for spec in project["project"]["dependencies"]:
        req, name = Requirement(spec), _key(spec)
        assert name in cuda, f"{name} is a serving dependency but not in requirements/serve-cuda.txt (make lock)"
        assert cuda[name] in req.specifier, f"{name}=={cuda[name]} does not satisfy {spec} (make lock)"
    assert cpu == {("onnxruntime" if k == "onnxruntime-gpu" else k): v for k, v in cuda.items()}
    training = {_key(spec) for spec in project["project"]["optional-dependencies"]["train"]}
    assert not training & set(cuda), "the serving image must not carry the training stack"
    build = _lock("build.txt")
    for spec in project["build-system"]["requires"]:
        assert _key(spec) in build, f"{spec}: not pinned in requirements/build.txt (make lock)"
        assert build[_key(spec)] in Requirement(spec).specifier, f"{spec}: requirements/build.txt (make lock)"


def test_the_cuda_base_matches_the_locked_onnxruntime_gpu() -> None:
    from importlib.metadata import version

    locked = _lock("serve-cuda.txt")["onnxruntime-gpu"]
    if version("onnxruntime-gpu") != locked:
        pytest.skip(f"this venv has onnxruntime-gpu {version('onnxruntime-gpu')}, the lock {locked}: make lock")
    from onnxruntime.capi import build_and_package_info as info

    base = next(args for op, args in _dockerfile() if op == "FROM" and args.endswith("AS cuda")).split()[0]
    m = re.match(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-", base)
    assert m, f"{base}: the GPU variant needs NVIDIA's CUDA runtime image with cuDNN"
    built_for = info.cuda_version
    assert m.group(1) == built_for.split(".")[0], f"{base}: onnxruntime-gpu {locked} is built for CUDA {built_for}"


# --- the health check, run for real ----------------------------------------------------------------------


def _healthcheck(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATECAST_")}
    return subprocess.run(
        [sys.executable, "-m", HEALTHCHECK, *args],
        env={**clean, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("deploy")
    shutil.copytree(DEFAULT_MODEL, repo / "taylor")
    srv = RunningServer(server_settings(repo))
    yield srv
    srv.stop()


def test_healthcheck_passes_against_a_serving_server(serving: RunningServer, tmp_path: Path) -> None:
    # as in the image: the server's own settings, bound to every interface; the check dials loopback
    done = _healthcheck({"GATECAST_HOST": "0.0.0.0", "GATECAST_PORT": str(serving.app.port)}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"healthy: 127.0.0.1:{serving.app.port}: SERVING"


def test_healthcheck_fails_clearly_on_a_closed_port(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = s.getsockname()[1]
        done = _healthcheck({"GATECAST_PORT": str(port)}, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith(f"unhealthy: 127.0.0.1:{port}: UNAVAILABLE: ")
    assert done.stdout == ""


def test_healthcheck_fails_while_no_model_is_loaded(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    srv = RunningServer(server_settings(empty))
    try:
        done = _healthcheck({}, "--address", srv.address, cwd=tmp_path)
    finally:
        srv.stop()
    assert done.returncode == 1
    assert done.stderr.strip() == f"unhealthy: {srv.address}: NOT_SERVING (no model loaded yet, or draining)"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GATECAST_PROT": "8500"}, "GATECAST_PROT (did you mean GATECAST_PORT?)"),
        ({"GATECAST_PORT": "0"}, "GATECAST_PORT is 0"),
        ({"GATECAST_PORT": "eighty"}, "GATECAST_PORT"),
    ],
)
def test_healthcheck_refuses_bad_settings_with_their_name(tmp_path: Path, env: dict[str, str], message: str) -> None:
    done = _healthcheck(env, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("unhealthy: ") and message in done.stderr
    assert "Traceback" not in done.stderr


# --- the health check under TLS: the settings the server has, the certificates of tests/test_security.py ----


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates for 127.0.0.1: CA-signed (server), self-signed (self), from another CA (stranger)."""
    pki = Pki(tmp_path_factory.mktemp("pki"), _issue("gatecast test CA"), _issue("someone else's CA"))
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for name, issuer in (("server", pki.ca), ("self", None), ("stranger", pki.rogue_ca)):
        cert, key = _issue("localhost", issuer, san)
        pki.write(f"{name}.pem", _pem(cert))
        pki.write(f"{name}.key", _key_pem(key))
    pki.write("ca.pem", pki.ca_pem)
    pki.write("rogue.pem", _pem(pki.rogue_ca[0]))
    return pki


def _tls_server(repo: Path, certs: Pki, cert: str, **kw: object) -> tuple[RunningServer, dict[str, str]]:
    """A TLS server, and the GATECAST_* environment the container would give the health check."""
    tls = dict(tls_cert_file=certs.dir / f"{cert}.pem", tls_key_file=certs.dir / f"{cert}.key", **kw)
    srv = RunningServer(server_settings(repo, **tls))
    env = {"GATECAST_PORT": str(srv.app.port)} | {f"GATECAST_{k.upper()}": str(v) for k, v in tls.items()}
    return srv, env


def test_healthcheck_speaks_tls_with_the_servers_settings(repo_with_model: Path, certs: Pki, tmp_path: Path) -> None:
    srv, env = _tls_server(repo_with_model, certs, "self")
    try:
        trusted = _healthcheck(env, cwd=tmp_path)  # a self-signed certificate is its own trust root
        plain = _healthcheck({"GATECAST_PORT": env["GATECAST_PORT"]}, cwd=tmp_path)
    finally:
        srv.stop()
    assert trusted.returncode == 0, trusted.stderr
    assert trusted.stdout.strip() == f"healthy: 127.0.0.1:{env['GATECAST_PORT']}: SERVING"
    assert plain.returncode == 1 and plain.stderr.startswith(f"unhealthy: 127.0.0.1:{env['GATECAST_PORT']}: ")


def test_healthcheck_under_mutual_tls_presents_the_servers_certificate(
    repo_with_model: Path, certs: Pki, tmp_path: Path
) -> None:
    srv, env = _tls_server(repo_with_model, certs, "server", tls_client_ca_file=certs.dir / "ca.pem")
    try:
        ok = _healthcheck(env, cwd=tmp_path)  # gRPC takes the CA-signed server certificate itself as the anchor
        with_ca = _healthcheck(env, "--ca-file", str(certs.dir / "ca.pem"), cwd=tmp_path)
        untrusted = _healthcheck(env, "--ca-file", str(certs.dir / "rogue.pem"), cwd=tmp_path)
        missing = _healthcheck(env, "--ca-file", str(certs.dir / "nope.pem"), cwd=tmp_path)
        stranger = ("--client-cert", str(certs.dir / "stranger.pem"), "--client-key", str(certs.dir / "stranger.key"))
        refused = _healthcheck(env, *stranger, cwd=tmp_path)  # the server does ask for a client certificate
    finally:
        srv.stop()
    assert ok.returncode == 0, ok.stderr
    assert with_ca.returncode == 0, with_ca.stderr
    assert untrusted.returncode == 1 and "UNAVAILABLE" in untrusted.stderr
    assert refused.returncode == 1 and refused.stderr.startswith(f"unhealthy: 127.0.0.1:{env['GATECAST_PORT']}: ")
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"unhealthy: CA file {certs.dir / 'nope.pem'}: No such file or directory"

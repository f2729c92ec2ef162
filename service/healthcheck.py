"""`python -m gatecast.service.healthcheck`: ask the server's gRPC health service; exit 0 when it is SERVING.

The container's HEALTHCHECK runs this inside the server's own environment, so it reads the same settings
(GATECAST_* variables, an optional --settings file) and dials the port, and the TLS, that the server uses.
Anything else (refused, timed out, NOT_SERVING, invalid settings) exits 1 with one line on stderr saying why.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gatecast.errors import UserError

from .settings import Settings, load_settings

WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]", "[::]": "[::1]"}


def target(settings: Settings) -> str:
    """Where a process beside the server reaches it: a wildcard bind is dialled on loopback."""
    if settings.port == 0:
        raise UserError("GATECAST_PORT is 0 (the server picks a free port at start): give --address HOST:PORT")
    host = WILDCARD_HOSTS.get(settings.host, settings.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"{host}:{settings.port}"


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{what} {path}: {e.strerror}") from e


def credentials(settings: Settings, args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS when the server serves TLS (tls_cert_file set); a client certificate when it asks for one.

    The server's certificate is the default trust anchor (gRPC takes a CA-signed one as its own anchor too;
    --ca-file to trust a CA instead), and its key pair the default client identity under mutual TLS, which
    the client CA accepts when it signed the server's certificate (--client-cert/--client-key otherwise).
    """
    cert: Path | None = getattr(settings, "tls_cert_file", None)
    if cert is None:
        return None
    key: Path | None = getattr(settings, "tls_key_file", None)
    mutual = getattr(settings, "tls_client_ca_file", None) is not None
    client_cert = args.client_cert or (cert if mutual else None)
    client_key = args.client_key or (key if mutual else None)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(args.ca_file or cert, "CA file"),
        private_key=_read(client_key, "client key"),
        certificate_chain=_read(client_cert, "client certificate"),
    )


def check(address: str, creds: grpc.ChannelCredentials | None, service: str, timeout: float, name: str | None) -> str:
    """The health status name, e.g. "SERVING"; raises grpc.RpcError when the server does not answer."""
    options = [("grpc.ssl_target_name_override", name)] if name else []
    with grpc.secure_channel(address, creds, options) if creds else grpc.insecure_channel(address, options) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gatecast.service.healthcheck", description=__doc__.splitlines()[0])
    p.add_argument("--settings", type=Path, help="the server's settings file (TOML); GATECAST_* variables override it")
    p.add_argument("--address", help="HOST:PORT to ask (default: the configured host and port; a wildcard is loopback)")
    p.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    p.add_argument("--server-name", help="TLS: the name the server's certificate carries, when not the address's")
    p.add_argument("--ca-file", type=Path, help="TLS: CA certificate(s) to trust (default: tls_cert_file)")
    p.add_argument("--client-cert", type=Path, help="mutual TLS: client certificate (default: tls_cert_file)")
    p.add_argument("--client-key", type=Path, help="mutual TLS: client key (default: tls_key_file)")
    args = p.parse_args(argv)
    address = args.address
    try:
        settings = load_settings(args.settings)
        address = address or target(settings)
        status = check(address, credentials(settings, args), args.service, args.timeout, args.server_name)
    except UserError as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        code = e.code().name if isinstance(e, grpc.Call) else "UNKNOWN"
        details = e.details() if isinstance(e, grpc.Call) else str(e)
        print(f"unhealthy: {address}: {code}: {details}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"unhealthy: {address}: {status} (no model loaded yet, or draining)", file=sys.stderr)
        return 1
    print(f"healthy: {address}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

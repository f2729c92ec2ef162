"""Who may call and who is calling: TLS credentials from the settings, the bearer-token check, and the
caller's identity that owns its sessions (docs/readme/security.md).

Health stays open without a token: load balancers and orchestrators probe it with no credentials, and it
tells nothing but SERVING. Reflection needs the token like the Forecaster does: it lists the API to
whoever asks, and grpcurl sends the token with `-H 'authorization: Bearer ...'`. Tokens are never logged
or sent back; a token is named by its fingerprint (`token:` and 12 hex digits of its SHA-256)."""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from gatecast import is_header_token

from .settings import Settings, SettingsError

log = logging.getLogger(__name__)

OPEN_PREFIX = "/grpc.health.v1.Health/"  # answered without a token
MIN_TOKEN_CHARS = 16  # a shorter token can be guessed
TOKENS_RECHECK_S = 1.0  # the token file is looked at (stat) at most this often


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SettingsError(f"{setting} {path} cannot be read: {e.strerror or e}") from e


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port (None: plain text); with a client CA, mutual TLS: a client without a
    certificate signed by that CA fails the handshake. The files are checked here, so that a wrong path, a
    key that does not match or a file that is not PEM stops the server with the setting named."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    cert = _read(settings.tls_cert_file, "GATECAST_TLS_CERT_FILE")
    key = _read(settings.tls_key_file, "GATECAST_TLS_KEY_FILE")
    check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        check.load_cert_chain(settings.tls_cert_file, settings.tls_key_file, password=b"")
    except (ssl.SSLError, ValueError, TypeError) as e:
        raise SettingsError(
            f"GATECAST_TLS_CERT_FILE {settings.tls_cert_file} and GATECAST_TLS_KEY_FILE {settings.tls_key_file} "
            f"do not load ({getattr(e, 'reason', None) or e}); expected a PEM certificate chain and the matching "
            "unencrypted PEM private key"
        ) from e
    ca = None
    if settings.tls_client_ca_file is not None:
        ca = _read(settings.tls_client_ca_file, "GATECAST_TLS_CLIENT_CA_FILE")
        try:  # from the file: PEM text around the certificates (a bundle's UTF-8 comments) is skipped
            check.load_verify_locations(cafile=str(settings.tls_client_ca_file))
        except (ssl.SSLError, ValueError, TypeError) as e:
            raise SettingsError(
                f"GATECAST_TLS_CLIENT_CA_FILE {settings.tls_client_ca_file} holds no usable certificate "
                f"({getattr(e, 'reason', None) or e}); expected PEM CA certificates"
            ) from e
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def metrics_tls(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for prometheus_client's `start_http_server`: with `metrics_tls`, the gRPC port's
    certificate, and its client CA (client certificate required) when one is set; else none."""
    if not settings.metrics_tls or settings.tls_cert_file is None or settings.tls_key_file is None:
        return {}
    kw: dict[str, Any] = {"certfile": str(settings.tls_cert_file), "keyfile": str(settings.tls_key_file)}
    if settings.tls_client_ca_file is not None:
        kw.update(client_cafile=str(settings.tls_client_ca_file), client_auth_required=True)
    return kw


@functools.lru_cache(maxsize=1024)  # asked on every session call; only accepted tokens reach it
def token_name(token: str) -> str:
    """What names a token in identities, logs and errors: a fingerprint, never the token."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def parse_tokens(text: str, where: str) -> list[str]:
    """One token per line; blank lines and lines starting with # are skipped. Errors name the line, never
    the token."""
    tokens = []
    # lines end at \n only (\r stripped below): str.splitlines would also break at U+2028 and the like, and
    # so take a line that is not printable ASCII for two tokens
    for n, line in enumerate(text.split("\n"), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not is_header_token(token):
            raise SettingsError(f"{where}, line {n}: a token is printable ASCII without spaces (sent as a header)")
        if len(token) < MIN_TOKEN_CHARS:
            raise SettingsError(
                f"{where}, line {n}: a token of {len(token)} characters is too easy to guess; "
                f"use at least {MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 32`)"
            )
        tokens.append(token)
    return tokens


class TokenFile:
    """The accepted tokens, re-read when the file's inode, size or modification time change (looked at
    at most every TOKENS_RECHECK_S). At start an unreadable, empty or invalid file is a SettingsError.
    Later, a file that cannot be read or parsed accepts no token until it is fixed (fail closed): a
    file emptied or removed on purpose revokes every token."""

    def __init__(self, path: Path) -> None:
        self.path = path
        where = f"GATECAST_AUTH_TOKENS_FILE {path}"
        self._stamp = self._stat(where)
        tokens = parse_tokens(_read(path, "GATECAST_AUTH_TOKENS_FILE").decode("utf-8", "replace"), where)
        if not tokens:
            raise SettingsError(f"{where} holds no token; expected one token per line")
        self._digests = self._digest(tokens)
        self._checked = time.monotonic()

    @staticmethod
    def _digest(tokens: list[str]) -> tuple[bytes, ...]:
        return tuple(hashlib.sha256(t.encode()).digest() for t in tokens)

    def _stat(self, where: str) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise SettingsError(f"{where} cannot be read: {e.strerror or e}") from e
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < TOKENS_RECHECK_S:
            return
        self._checked = now
        where = f"token file {self.path}"
        try:
            stamp = self._stat(where)
            if stamp == self._stamp:
                return
            self._stamp = stamp
            tokens = parse_tokens(self.path.read_text("utf-8", "replace"), where)
        except (OSError, SettingsError) as e:
            self._stamp, self._digests = (0, 0, 0), ()
            log.error("%s: %s; no token is accepted until it is fixed", where, getattr(e, "message", e))
            return
        self._digests = self._digest(tokens)
        log.info("re-read %s: %d token(s)%s", self.path, len(tokens), "" if tokens else ", every token refused")

    def accepts(self, token: str) -> bool:
        """Compared in constant time against every token (no early exit tells which one came close)."""
        self._refresh()
        digest = hashlib.sha256(token.encode()).digest()
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        return found


def bearer(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The token of the first `authorization: Bearer <token>` header, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def _refusal(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as the one refused (a stream is refused before its first message)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is not None and handler.request_streaming:
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class BearerTokens(grpc.aio.ServerInterceptor):
    """Every method but health needs `authorization: Bearer <token>` with a token from the file; others
    are answered UNAUTHENTICATED (unknown methods too, so that the API is not probed without a token)."""

    MISSING = "no bearer token: send the metadata 'authorization: Bearer <token>' (token authentication is on)"
    REFUSED = "the bearer token is not accepted (unknown or revoked); ask the operator for a valid one"

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if str(details.method).startswith(OPEN_PREFIX):
            return await continuation(details)
        token = bearer(details.invocation_metadata)  # type: ignore[attr-defined]
        if token is not None and self.tokens.accepts(token):
            return await continuation(details)
        return _refusal(await continuation(details), self.MISSING if token is None else self.REFUSED)


def authenticates(settings: Settings) -> bool:
    """Whether callers have an identity: client certificates or bearer tokens are required."""
    return settings.tls_client_ca_file is not None or settings.auth_tokens_file is not None


def caller_identity(context: grpc.aio.ServicerContext, settings: Settings) -> str | None:
    """Who is calling, for session ownership and the per-identity session cap: the client certificate's
    subject (mutual TLS), the token's fingerprint (tokens on), or both; None when neither is required. Only
    checked credentials count: the handshake verified the certificate, the interceptor the token."""
    if not authenticates(settings):
        return None
    parts = []
    if settings.tls_client_ca_file is not None:
        auth = context.auth_context()
        subject = auth.get("x509_subject") or auth.get("x509_common_name")
        if subject:
            parts.append(subject[0].decode("utf-8", "replace"))
    if settings.auth_tokens_file is not None:
        token = bearer(context.invocation_metadata())
        if token is not None:
            parts.append(token_name(token))
    return " ".join(parts) or None

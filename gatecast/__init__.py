"""gatecast: gated recurrent forecasters, trained with PyTorch and served over gRPC on onnxruntime.

This package holds what training and serving share and what never needs torch: the generated
API (`gatecast.v1`), the model manifest, and the command line.
"""

__version__ = "0.1.0"

# The metadata a proxy routes a session's calls by (deploy/haproxy.cfg): the session's id, which a client may
# propose on OpenSession (the server adopts it) and then sends on every call of the session.
SESSION_HEADER = "x-gatecast-session"


def is_header_token(token: str) -> bool:
    """Whether a bearer token can travel in the authorization header as it is: printable ASCII, no spaces.
    The server's tokens file and the client's token are held to it alike."""
    return bool(token) and all(33 <= ord(ch) < 127 for ch in token)

"""Non-canonical request paths, as an attacker holding a valid key would send them, and a raw HTTPS client.

Caddy's `path` matcher compares a cleaned, lower-cased path with trailing dots trimmed, while
`reverse_proxy` forwards the path as sent; every path here differs from the canonical form the
gateway accepts, and those in TRAVERSALS clean to a public path while naming one of vLLM's private
routes (a prefix mount like /metrics answers anything under it).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

# vLLM's routes no client may reach: Prometheus metrics, the OpenAPI schema and its docs page, the tokenizer.
PRIVATE_ROUTES = ("/metrics", "/openapi.json", "/docs", "/tokenize", "/detokenize")
PUBLIC_PATH = "/v1/models"


def traversals(private: str) -> tuple[str, ...]:
    """Spellings of `private` followed by a way back up to /v1/models: cleaned, each is /v1/models."""
    return (
        f"{private}/../v1/models",
        f"{private}/./../v1/models",
        f"{private}/%2e%2e/v1/models",
        f"{private}/%2E%2E/v1/models",
        f"{private}/.%2e/v1/models",
        f"{private}/..%2fv1%2fmodels",
        f"{private}%2f..%2fv1%2fmodels",
        f"{private}//../../v1/models",
    )


TRAVERSALS = tuple(path for private in PRIVATE_ROUTES for path in traversals(private))

# The public path spelt every other way Caddy's matcher would take as /v1/models.
SPELLINGS = (
    "/V1/MODELS",
    "/v1/Models",
    "/v1/models.",
    "/v1/models..",
    "/v1/models%2e",
    "/v1/models%20",
    "//v1/models",
    "/v1//models",
    "/v1/./models",
    "/./v1/models",
    "/v1/models/",
    "/v1/models/.",
    "/v1%2fmodels",
    "/v1%2Fmodels",
    "/v1/%6dodels",
    "/v1/models;x",
    "/v1/../v1/models",
)

NON_CANONICAL = TRAVERSALS + SPELLINGS


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def raw_https(
    port: int, hostname: str, context: ssl.SSLContext, method: str, target: str, headers: dict[str, str]
) -> RawResponse:
    """One HTTP/1.1 request with the request target written to the socket byte for byte (an HTTP
    client would clean or re-encode it), to 127.0.0.1:port with `hostname` as SNI and Host."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {hostname}", "Connection: close", "Content-Length: 0"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as plain:
        with context.wrap_socket(plain, server_hostname=hostname) as tls:
            tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            chunks = []
            while chunk := tls.recv(65536):
                chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    if parsed.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return RawResponse(int(status_line.split()[1]), parsed, body)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out

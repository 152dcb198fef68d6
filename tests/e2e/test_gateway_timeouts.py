"""Timeouts on the gateway's hops, against real Caddy and authz with a stub vLLM: a client trickling
its body is cut off, and no stream outlasts the stack's max_stream_seconds."""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Iterator

import httpx
import pytest

from gpugate_runtime.contract.host import REQUEST_ID_HEADER
from tests.e2e.gateway_fixtures import HOSTNAME, Gateway, running_gateway

pytestmark = pytest.mark.e2e

READ_BODY_SECONDS = 2
MAX_STREAM_SECONDS = 6


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    timeouts = {"read_body_seconds": READ_BODY_SECONDS, "max_stream_seconds": MAX_STREAM_SECONDS}
    with running_gateway(tmp_path_factory.mktemp("timeouts"), config={"gpugate:timeouts": timeouts}) as running:
        yield running


def test_a_body_trickled_at_one_byte_a_second_is_cut_off_within_read_body_seconds(gateway: Gateway) -> None:
    # given a client with a valid key announcing a 60-byte body
    key = gateway.new_key("trickler")
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOSTNAME}\r\nAuthorization: Bearer {key.token}\r\n"
        f"{REQUEST_ID_HEADER}: e2e-trickle-000001\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n"
    )
    context = ssl.create_default_context(cafile=str(gateway.ca_file))
    sent, ended, answer = 0, None, b""
    with socket.create_connection(("127.0.0.1", gateway.https_port), timeout=10) as plain:
        with context.wrap_socket(plain, server_hostname=HOSTNAME) as tls:
            started = time.monotonic()
            tls.sendall(head.encode())
            # when it sends the body one byte a second (at most 60 s), watching for the gateway to give up
            tls.settimeout(0.0)
            while sent < 60:
                select.select([tls], [], [], 1.0)
                try:
                    answer = tls.recv(65536)  # b"" at EOF; SSLWantReadError: nothing but TLS housekeeping yet
                except ssl.SSLWantReadError:
                    pass
                except (ConnectionError, ssl.SSLError):
                    answer = b""
                else:
                    ended = time.monotonic() - started
                    break
                try:
                    tls.send(b"x")
                except (ConnectionError, ssl.SSLError):
                    ended = time.monotonic() - started
                    break
                sent += 1
    # then the gateway ended the request after about read_body_seconds, long before the body was in
    assert ended is not None, f"the gateway still read the body after {sent} bytes at 1 byte/s"
    assert READ_BODY_SECONDS - 0.5 < ended < READ_BODY_SECONDS + 2.5, (ended, answer[:80])
    assert 0 < sent < 10
    # and it answered the 503 every failed proxying gets (or just closed the connection)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 503 "), answer[:80]


def test_a_stream_longer_than_max_stream_seconds_is_ended(gateway: Gateway) -> None:
    # given vLLM streaming 40 chunks 0.5 s apart (20 s, far past max_stream_seconds)
    key = gateway.new_key("long-streamer")
    body = {"model": "stub", "stream": True, "chunks": 40, "delay": 0.5, "messages": []}
    chunks, done, error = 0, False, None
    with gateway.client() as client:
        started = time.monotonic()
        # when the client reads the whole stream
        try:
            with client.stream(
                "POST",
                "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key.token}"},
                extensions={"sni_hostname": HOSTNAME},
            ) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunks += 1
        except httpx.HTTPError as exc:
            error = exc
        ended = time.monotonic() - started
    # then the gateway ended it after about max_stream_seconds, unfinished: the client sees a broken stream
    assert isinstance(error, httpx.RemoteProtocolError | httpx.ReadError), error
    assert not done
    assert MAX_STREAM_SECONDS - 0.5 < ended < MAX_STREAM_SECONDS + 2.5, ended
    assert 2 * (MAX_STREAM_SECONDS - 1) <= chunks < 40
    # and a new request of the same key goes through
    with gateway.client() as client:
        after = gateway.request(client, "GET", "/v1/models", headers={"Authorization": f"Bearer {key.token}"})
    assert after.status_code == 200

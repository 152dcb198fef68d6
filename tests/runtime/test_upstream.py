"""The router's HTTP/1.1 client against real loopback servers: connections kept alive and reused, a connection
the upstream closed while idle replaced without failing the request, refused connections and slow headers told apart."""

from __future__ import annotations

import asyncio

import pytest
from gpugate_runtime.upstream import ConnectFailed, FirstByteTimeout, Origin

# Each test serves raw HTTP on loopback: not part of the service-free fast subset.
pytestmark = pytest.mark.e2e

ANSWER = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'


async def serve(close_after_answer: bool, delay: float = 0.0) -> tuple[asyncio.Server, list[int]]:
    """A raw HTTP/1.1 server: answers each request (after `delay`); closes the connection after each answer
    without saying so when `close_after_answer`, as an upstream that times out idle connections does."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer.get_extra_info("peername")[1])
        while True:
            head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
            if not head:
                break
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            await reader.readexactly(length)
            await asyncio.sleep(delay)
            writer.write(ANSWER)
            await writer.drain()
            if close_after_answer:
                break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, connections


async def post(origin: Origin, timeout: float = 5) -> bytes:
    response = await origin.post("/v1/chat/completions", [(b"content-type", b"application/json")], b"{}", timeout)
    body = b"".join([chunk async for chunk in response.chunks()])
    await response.aclose()
    return body


def test_a_kept_alive_connection_is_reused() -> None:
    async def run() -> list[int]:
        server, connections = await serve(close_after_answer=False)
        origin = Origin(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", 2)
        bodies = [await post(origin) for _ in range(3)]
        assert bodies == [b'{"ok":true}'] * 3
        origin.close()
        server.close()
        return connections

    assert len(asyncio.run(run())) == 1


def test_a_connection_the_upstream_closed_while_idle_is_replaced_without_failing() -> None:
    async def run() -> list[int]:
        server, connections = await serve(close_after_answer=True)
        origin = Origin(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", 2)
        for _ in range(3):
            assert await post(origin) == b'{"ok":true}'
            await asyncio.sleep(0.05)  # the server's close arrives
        origin.close()
        server.close()
        return connections

    assert len(asyncio.run(run())) == 3


def test_a_refused_connection_and_slow_headers_are_told_apart() -> None:
    async def run() -> None:
        server, _ = await serve(close_after_answer=False, delay=1.0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(FirstByteTimeout):
            await post(Origin(f"http://127.0.0.1:{port}", 2), timeout=0.2)
        server.close()
        await server.wait_closed()
        with pytest.raises(ConnectFailed):
            await post(Origin(f"http://127.0.0.1:{port}", 2))

    asyncio.run(run())

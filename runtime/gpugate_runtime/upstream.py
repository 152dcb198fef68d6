"""The router's HTTP/1.1 client: kept-alive connections per upstream, responses parsed by httptools, bodies streamed.

httpx took most of the router's time per request (about 1 ms of 1.5 on the bench machine: request
building, httpcore's pool, h11 in pure Python); this does only what the router needs: one POST, its
status and headers, then the body as it arrives, on a connection reused while the upstream keeps it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools


class ConnectFailed(Exception):
    """The upstream refused or did not accept the connection in time."""


class FirstByteTimeout(Exception):
    """The upstream accepted the request but sent no response headers in time."""


class UpstreamBroken(Exception):
    """The upstream closed the connection or sent something that is not HTTP/1.1."""


_READ = 65536


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        self.writer.close()


class Response:
    """Status and headers of an answer; `chunks()` yields its (de-chunked) body as it arrives."""

    def __init__(
        self, origin: Origin, connection: _Connection, parser: httptools.HttpResponseParser, state: _State, read_timeout: float
    ) -> None:
        self._origin, self._connection, self._parser, self._state = origin, connection, parser, state
        self._read_timeout = read_timeout
        self.status_code = parser.get_status_code()
        self.headers = state.headers
        self._done = False

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.headers if key.lower() == name), None)

    async def chunks(self) -> AsyncIterator[bytes]:
        state = self._state
        while True:
            while state.body:
                yield state.body.popleft()
            if state.complete:
                break
            try:
                async with asyncio.timeout(self._read_timeout):
                    data = await self._connection.reader.read(_READ)
            except TimeoutError:
                raise UpstreamBroken("no body bytes within the read timeout") from None
            if not data:
                if state.until_close:
                    state.complete = True  # a body delimited by the connection's end
                    continue
                raise UpstreamBroken("the upstream closed the connection mid-body")
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise UpstreamBroken(f"not HTTP/1.1: {exc}") from None
        self._done = True

    async def aclose(self) -> None:
        """Give the connection back when the answer was read whole and may be reused, else close it."""
        if self._done and self._state.complete and self._state.keep_alive and not self._state.until_close:
            self._origin.release(self._connection)
        else:
            self._connection.close()


class _State:
    """What httptools' callbacks collect for one response."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: deque[bytes] = deque()
        self.headers_complete = False
        self.complete = False
        self.until_close = False
        self.keep_alive = False
        self.parser: httptools.HttpResponseParser | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_complete = True
        # Asked here: once the message has ended, httptools answers False.
        self.keep_alive = self.parser is not None and self.parser.should_keep_alive()
        names = {name.lower() for name, _ in self.headers}
        self.until_close = b"content-length" not in names and b"transfer-encoding" not in names

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class Origin:
    """One upstream (`http://host:port` or `https://...`) with a pool of idle kept-alive connections."""

    def __init__(self, base_url: str, connect_timeout: float, max_idle: int = 64) -> None:
        parts = urlsplit(base_url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.host_header = parts.netloc.encode()
        self.connect_timeout = connect_timeout
        self._ssl = ssl.create_default_context() if self.https else None
        self._idle: list[_Connection] = []
        self._max_idle = max_idle

    def release(self, connection: _Connection) -> None:
        if len(self._idle) < self._max_idle:
            self._idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self._ssl, limit=_READ)
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(f"{self.host}:{self.port}: {exc or type(exc).__name__}") from None
        return _Connection(reader, writer)

    async def post(self, path: str, headers: list[tuple[bytes, bytes]], body: bytes, first_byte_timeout: float) -> Response:
        """POST `body` to the origin's path prefix + `path`; returns once the response headers are in."""
        head = [
            f"POST {self.prefix}{path} HTTP/1.1\r\n".encode(),
            b"host: ",
            self.host_header,
            b"\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\n",
        ]
        for name, value in headers:
            head += [name, b": ", value, b"\r\n"]
        request = b"".join(head) + b"\r\n" + body
        while self._idle:
            # A kept-alive connection the upstream has closed meanwhile answers nothing: then a fresh one.
            connection = self._idle.pop()
            try:
                return await self._exchange(connection, request, first_byte_timeout)
            except _Stale:
                connection.close()
        connection = await self._connect()
        try:
            return await self._exchange(connection, request, first_byte_timeout)
        except _Stale:
            connection.close()
            raise UpstreamBroken("the upstream closed a new connection without answering") from None

    async def _exchange(self, connection: _Connection, request: bytes, first_byte_timeout: float) -> Response:
        state = _State()
        parser = state.parser = httptools.HttpResponseParser(state)
        try:
            connection.writer.write(request)
            async with asyncio.timeout(first_byte_timeout):
                received = False
                while not state.headers_complete:
                    data = await connection.reader.read(_READ)
                    if not data:
                        if not received:
                            raise _Stale
                        raise UpstreamBroken("the upstream closed the connection before its headers ended")
                    received = True
                    parser.feed_data(data)
        except TimeoutError:
            connection.close()
            raise FirstByteTimeout(f"no response headers within {first_byte_timeout:g} s") from None
        except (ConnectionError, BrokenPipeError):
            raise _Stale from None
        except httptools.HttpParserError as exc:
            connection.close()
            raise UpstreamBroken(f"not HTTP/1.1: {exc}") from None
        except httptools.HttpParserUpgrade:
            connection.close()
            raise UpstreamBroken("the upstream asked for a protocol upgrade") from None
        return Response(self, connection, parser, state, first_byte_timeout)


class _Stale(Exception):
    """A connection that answered nothing (closed by the upstream): the request was not read."""

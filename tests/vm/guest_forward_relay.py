"""Relay one guest connection to a service on this machine's loopback; QEMU runs it per connection (guestfwd cmd:).

QEMU's user network starts `python guest_forward_relay.py PORT` with the guest's TCP connection
as stdin/stdout each time the guest connects to the forward's address, and this copies bytes both ways
between it and 127.0.0.1:PORT until either side closes. Only loopback is reachable this way.
"""

from __future__ import annotations

import selectors
import socket
import sys

CONNECT_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 600.0  # a connection silent this long in both directions is dropped
CHUNK = 65536
LOOPBACK = "127.0.0.1"


def relay(port: int) -> int:
    guest = socket.socket(fileno=0)  # QEMU passes one end of a socket pair as fds 0, 1 and 2
    try:
        host = socket.create_connection((LOOPBACK, port), timeout=CONNECT_TIMEOUT_S)
    except OSError:
        guest.close()
        return 1
    host.settimeout(None)
    peers = {guest: host, host: guest}
    with selectors.DefaultSelector() as selector:
        selector.register(guest, selectors.EVENT_READ)
        selector.register(host, selectors.EVENT_READ)
        open_reads = 2
        while open_reads:
            events = selector.select(IDLE_TIMEOUT_S)
            if not events:
                break
            for key, _ in events:
                source: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = source.recv(CHUNK)
                except OSError:
                    data = b""
                if data:
                    peers[source].sendall(data)
                    continue
                selector.unregister(source)  # this side finished sending: pass the half-close on
                open_reads -= 1
                try:
                    peers[source].shutdown(socket.SHUT_WR)
                except OSError:
                    pass
    host.close()
    guest.close()
    return 0


def main() -> None:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.stderr.write("usage: guest_forward_relay.py PORT\n")
        raise SystemExit(2)
    raise SystemExit(relay(int(sys.argv[1])))


if __name__ == "__main__":
    main()

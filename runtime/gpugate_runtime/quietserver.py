"""uvicorn's server with its housekeeping tick once a second instead of ten times, for services that mostly idle."""

from __future__ import annotations

import asyncio
import contextlib
from types import FrameType
from typing import Any

import uvicorn

from gpugate_runtime.contract.host import LOOPBACK

# uvicorn wakes its main loop every 0.1 s, to refresh the Date header (once a second) and to see
# whether a signal asked it to stop. For authz, the prober and the alert sink, which serve a few
# requests a minute on an idle gateway, those wake-ups were most of their idle CPU (bench/idle_cpu.py).
TICK_SECONDS = 1.0
# uvicorn's on_tick refreshes the default headers when its counter is a multiple of 10 (= 1 s at 10 Hz).
_TICKS_PER_HEADER_REFRESH = 10


class QuietServer(uvicorn.Server):
    """A uvicorn.Server whose main loop wakes once a second, or at once when a signal asks it to stop."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + _TICKS_PER_HEADER_REFRESH) % 864000  # the modulus uvicorn uses
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_SECONDS):
                    await self._wake.wait()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # Runs as a signal handler; call_soon_threadsafe wakes the loop, so stopping takes no tick.
        if self._loop is not None and self._wake is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)


def loopback_server(app: Any, port: int, log_level: str) -> QuietServer:
    """A QuietServer for one of the runtime's small services (the prober, the alert sink): on loopback
    only, no lifespan, no access log (privacy: request lines never reach a log)."""
    config = uvicorn.Config(app, host=LOOPBACK, port=port, lifespan="off", access_log=False, log_level=log_level)
    return QuietServer(config)

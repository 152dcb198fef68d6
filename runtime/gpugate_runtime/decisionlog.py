"""authz's decision log: one JSON line per decision (metadata only), written through a buffer."""

from __future__ import annotations

import json
import logging
import os
import sys
from logging.handlers import WatchedFileHandler
from typing import TextIO

from gpugate_runtime.settings import AuthzSettings

log = logging.getLogger("gpugate_runtime.authz")


class DecisionLog(WatchedFileHandler):
    """authz's log file, written through a buffer.

    WatchedFileHandler stats the file (has logrotate moved it?) and flushes its buffer for every
    record: two system calls per decision, which measured a third of authz's CPU per request
    (bench/gateway_overhead.py). Here decision lines collect in the file object's buffer and go out
    on the maintenance loop's next tick (`sync`), at most access_log_poll_seconds (50 ms by default)
    after the decision, which is also when rotation is checked; any other record (start-up, store
    reloads, warnings, errors) is written at once. A crash can lose at most one tick of decision lines.
    """

    def _open(self) -> TextIO:  # logging.FileHandler's hook for opening the stream
        # Decision lines name keys and request ids: a new log (first start, after logrotate moved
        # it) is its owner's only, whatever the umask; /dev/stdout in a pod is opened as it is.
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        if not isinstance(record.msg, dict):
            super().emit(record)  # check rotation, write, flush
            return
        try:
            self.stream.write(self.format(record) + self.terminator)
        except Exception:  # noqa: BLE001 - logging's own contract: report and go on
            self.handleError(record)

    def sync(self) -> None:
        with self.lock:
            if self.stream:
                self.stream.flush()
            self.reopenIfNeeded()


def sync_decision_log() -> None:
    for handler in log.handlers:
        if isinstance(handler, DecisionLog):
            handler.sync()


class JsonLines(logging.Formatter):
    """One JSON object per line: decisions are logged as dicts, other events as text."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, dict):
            entry = {"ts": round(record.created, 6), **record.msg}
        else:
            entry = {"ts": round(record.created, 6), "level": record.levelname.lower(), "event": record.getMessage()}
            if record.exc_info:
                entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def configure_logging(settings: AuthzSettings) -> None:
    # One log record per decision: skip what logging would otherwise gather for each (caller's
    # file and line, thread, process), a third of a decision's cost. See "Optimization" in the
    # logging HOWTO.
    logging._srcfile = None  # noqa: SLF001 - the documented switch
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    settings.log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = DecisionLog(settings.log_file)  # buffered; reopens after logrotate moves the file
    handler.setFormatter(JsonLines())
    log.handlers[:] = [handler]
    log.setLevel(settings.log_level.upper())
    log.propagate = False
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)  # uvicorn's own messages

"""Exit codes of every gpugate command, operator side and host side."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    # A check failed: a policy violation, a failing probe, a firing alert, a refused key operation.
    CHECK_FAILED = 1
    # Bad input: an invalid stack file, settings, flag or spec; the message names it.
    BAD_INPUT = 2

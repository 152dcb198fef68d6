"""Helpers for the Pulumi program's tests: run it under the planner's mocks and look at what it asked for."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import pulumi
import pytest

from gpugate.stackfile import Stack, load_stack
from infra.offline import Recorded, Run, record, use_mocks


def of_type(run: Run, type_token: str) -> list[Recorded]:
    return [r for r in run.resources if r.type == type_token]


def one(run: Run, type_token: str) -> Recorded:
    found = of_type(run, type_token)
    assert len(found) == 1, f"expected one {type_token}, got {[r.name for r in found]}"
    return found[0]


def under_mocks(stack: Stack, body: Callable[[], Any]) -> None:
    """Run `body` as a Pulumi unit test (pulumi/examples testing-unit-py style) in a context of its own:
    resources it creates go to the planner's mocks; an Output it returns is awaited, so checks made in
    `Output.all(...).apply(check)` fail the test."""

    def go() -> None:
        use_mocks(stack, Run())
        pulumi.runtime.test(body)()

    contextvars.Context().run(go)


@pytest.fixture(scope="session")
def staging() -> Run:
    return record(load_stack("staging"))


@pytest.fixture(scope="session")
def dev() -> Run:
    return record(load_stack("dev"))

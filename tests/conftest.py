from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support import gateway, simulator

# Processes the tests start run elsewhere (cwd /tmp): a relative PYTHONPATH (`PYTHONPATH=src pytest`)
# would make them import another checkout's bastion. Absolute, they run this one.
os.environ["PYTHONPATH"] = os.pathsep.join(
    os.path.abspath(part) for part in os.environ.get("PYTHONPATH", "").split(os.pathsep) if part
)


@pytest.fixture(scope="module")
def sim() -> Iterator[str]:
    """A fast simulator shared by a test module."""
    with simulator("--created", "1700000000", "--tokens", "12") as (_, base):
        yield base


@pytest.fixture(scope="module")
def gw(sim: str) -> Iterator[str]:
    """A gateway in front of the module's simulator."""
    with gateway("--upstream-url", sim) as (_, base):
        yield base

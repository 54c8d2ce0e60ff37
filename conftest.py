"""Shared by every pytest suite here (export/, bench/, clients/python/, deploy/): the model
fixtures, and the rule that under CI=true a missing part fails instead of skipping."""

import os
from pathlib import Path

import pytest


def fixtures() -> Path:
    return Path(os.environ.get("MULMD_TEST_MODELS") or Path.home() / ".cache/mulmd/test-models")


def required(what: str, hint: str):
    """A missing fixture, tool or binary: a failure under CI=true, a loud skip elsewhere."""
    if os.environ.get("CI") in ("true", "1"):
        pytest.fail(f"{what} is missing; {hint}")
    pytest.skip(f"{what} is missing; {hint}")


@pytest.fixture
def need():
    """`required` for tests and fixtures: need("openssh-server", "how to get it")."""
    return required


@pytest.fixture
def fixture_dir():
    """A prepared fixture by name (scripts/prepare-test-models makes them)."""

    def get(name: str) -> Path:
        p = fixtures() / name
        if not p.exists():
            required(f"fixture {p}", "run scripts/prepare-test-models")
        return p

    return get

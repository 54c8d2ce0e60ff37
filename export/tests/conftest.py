import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fixtures() -> Path:
    return Path(os.environ.get("MULMD_TEST_MODELS") or Path.home() / ".cache/mulmd/test-models")


@pytest.fixture
def fixture_dir():
    """A prepared fixture by name; missing ones fail under CI=true and skip (loudly) elsewhere."""

    def get(name: str) -> Path:
        p = fixtures() / name
        if not p.exists():
            if os.environ.get("CI") in ("true", "1"):
                pytest.fail(f"fixture {p} is missing; CI must run scripts/prepare-test-models first")
            pytest.skip(f"fixture {p} is missing; run scripts/prepare-test-models")
        return p

    return get

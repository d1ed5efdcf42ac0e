"""Shared test setup: hypothesis profiles, the shared data files and a tiny training corpus.

Profiles: `ci` (few examples, the default when the CI variable is set), `dev` (the default
otherwise) and `thorough` (many examples). Pick one with HYPOTHESIS_PROFILE=thorough.
"""

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(*parts):
    """Path to a file in ../shared/data, or skip the calling test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data file not found: {path}")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of 12 small documents of random words (seeded): training runs in the tests."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, size=300)) + ".\n")
    return folder

"""Shared fixtures for the verifier tests: one worker pool per test session."""

import pytest

from agent_spo.verify import VerifierPool


@pytest.fixture(scope="session")
def pool():
    with VerifierPool(workers=2, timeout_s=2.0) as p:
        yield p

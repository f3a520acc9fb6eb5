"""Fixtures and seeding. Helpers that test modules import live in helpers.py: a test module imports
neither conftest.py nor another test module (tests/test_hygiene.py checks)."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch
from helpers import TEST_SEED, rng_for, tiny_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))
# The Ctrl-C tests send SIGINT to `tinylm` subprocesses. A suite started as a background job of a
# non-interactive shell (`make test &`, nohup) has SIGINT ignored, and POSIX keeps an ignored signal ignored
# across exec: its subprocesses would never see the Ctrl-C (Python installs no handler for an ignored SIGINT).
# A handler is reset to the default at exec, so installing Python's own gives every subprocess the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_header() -> str:
    return f"tinylm: random choices seeded with TINYLM_TEST_SEED={TEST_SEED}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Seed torch's, numpy's and Python's global generators before each test and its fixtures, so that an
    unseeded draw does not depend on the tests that ran before it."""
    torch.manual_seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    random.seed(TEST_SEED)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = (yield).get_result()
    if report.failed:  # print the seed with the failure
        report.sections.append(("random seed", f"TINYLM_TEST_SEED={TEST_SEED} reproduces this run's random "
                                               "choices (the rng fixture and the seeded global generators)"))


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator for this test's random choices (see helpers.rng_for)."""
    return rng_for(request.node.nodeid)


@pytest.fixture
def tiny():
    return tiny_model()

"""The reliability suite's switches, shared fixtures and its closing count of bad inputs and injected faults.

Tests marked `reliability_slow` (load tests: minutes of CPU) run only with CPWB_RELIABILITY_SLOW=1
(`make test-reliability`); everything else runs in the normal `make test`.
Tests marked `bad_input(n)` or `fault(n)` add n to the count printed at the end of the session.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.reliability.jobs import Job

SLOW_ENV = "CPWB_RELIABILITY_SLOW"
_COUNTS: Counter = Counter()


def pytest_configure(config: pytest.Config) -> None:
    for line in (f"reliability_slow: load test of the reliability suite; runs with {SLOW_ENV}=1 "
                 "(make test-reliability)",
                 "bad_input(n): the test feeds n bad inputs that must be refused (counted in the summary)",
                 "fault(n): the test injects n faults (kill -9, NaN, tampering) that must lose nothing"):
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(SLOW_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"load test: run with {SLOW_ENV}=1 (make test-reliability)")
    for item in items:
        if "reliability_slow" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        for kind in ("bad_input", "fault"):
            marker = item.get_closest_marker(kind)
            if marker is not None:  # on the report, so that it reaches the controller from an xdist worker
                report.user_properties.append((kind, marker.args[0] if marker.args else 1))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed:
        for kind, count in report.user_properties:
            if kind in ("bad_input", "fault"):
                _COUNTS[kind] += count


def pytest_terminal_summary(terminalreporter) -> None:
    if _COUNTS:
        terminalreporter.write_line(f"reliability: {_COUNTS['bad_input']} bad inputs refused, "
                                    f"{_COUNTS['fault']} faults injected, nothing lost (passed tests only)")


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_lm) -> Path:
    """The conftest's tiny random Llama with the default tokenizer, saved as a local model folder."""
    from tests.conftest import make_tiny_lm

    folder = tmp_path_factory.mktemp("reliability") / "tiny-model"
    tokenizer = default_lm[1]
    make_tiny_lm(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    """test_train's eight ParaDetox-like pairs, two positives and one negative each."""
    from cpwb.data.pairs import PairRecord, PairText, write_pairs
    from tests.test_train import NEUTRAL, TOXIC

    records = [PairRecord(id=f"p{i}", anchor=n, positives=(PairText(n, "human"), PairText(n + ".", "human")),
                          negatives=(PairText(t, "human"),)) for i, (n, t) in enumerate(zip(NEUTRAL, TOXIC))]
    return write_pairs(tmp_path_factory.mktemp("reliability-pairs") / "pairs.jsonl", records)


@pytest.fixture
def one_thread():
    """In-process runs compared bit for bit with a driver's run use one thread, as the driver does."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def start_job(tmp_path):
    """Start `python -m tests.reliability.driver ...` (or any argv) as a killable job; killed at teardown."""
    jobs: list[Job] = []

    def start(*args: str, module: str = "tests.reliability.driver") -> Job:
        job = Job([sys.executable, "-m", module, *args], tmp_path / "logs")
        jobs.append(job)
        return job

    yield start
    for job in jobs:
        if job.process.poll() is None:
            job.kill()

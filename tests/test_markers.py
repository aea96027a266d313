"""The test-suite machinery itself: registered markers and the gpu skip/refuse rules of conftest.py.

Each test runs pytest in-process on a throwaway test file, with this repository's conftest.py and
pytest configuration copied next to it, so the real hooks and settings are the ones exercised.
"""

from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]

SAMPLE = """
import pytest

def test_plain():
    pass

@pytest.mark.gpu
def test_needs_gpu():
    raise AssertionError("gpu test body ran")
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyprojecttoml((ROOT / "pyproject.toml").read_text())
    pytester.makepyfile(test_sample=SAMPLE)
    return pytester


def test_gpu_tests_skip_without_cuda(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = suite.runpytest_inprocess("test_sample.py")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*gpu test: torch.cuda.is_available() is False*"])


def test_gpu_tests_run_with_cuda(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = suite.runpytest_inprocess("test_sample.py")
    # The gpu test's body raises: a failure proves it was collected and run, not skipped.
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*gpu test body ran*"])


@pytest.mark.parametrize("markexpr", ["gpu", "gpu and not slow"])
def test_selecting_gpu_tests_without_cuda_is_refused(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, markexpr: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = suite.runpytest_inprocess("-m", markexpr, "test_sample.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*selects gpu tests, but torch.cuda.is_available() is False*"])


def test_deselecting_gpu_tests_runs_the_rest(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = suite.runpytest_inprocess("-m", "not gpu", "test_sample.py")
    result.assert_outcomes(passed=1, deselected=1)


def test_registered_markers_pass_and_typos_are_refused(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_marks="""
import pytest

@pytest.mark.slow
@pytest.mark.distributed
def test_registered():
    pass
""",
        test_typo="""
import pytest

@pytest.mark.slwo
def test_typo():
    pass
""",
    )
    assert suite.runpytest_inprocess("test_marks.py").ret == pytest.ExitCode.OK
    typo = suite.runpytest_inprocess("test_typo.py")
    assert typo.ret != pytest.ExitCode.OK
    typo.stdout.fnmatch_lines(["*'slwo' not found in `markers` configuration option*"])

"""Every command answers `--help` at once: tools/*.py, train.py and the package's console scripts parse their
arguments before importing torch or other heavy modules. The limit is relative to this machine's interpreter
start-up, so a loaded machine does not fail it, while a command that imports torch first (seconds) does."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
TRIES = 3  # a command passes if one try is under the limit: a busy moment is not a regression


def console_scripts() -> dict[str, list[str]]:
    """pyproject's [project.scripts], each run as its installed script runs it (whatever this environment has
    installed): import the module, call the function."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    out = {}
    for name, target in scripts.items():
        module, func = target.split(":")
        code = f"import sys; from {module} import {func}; sys.argv[0] = {name!r}; sys.exit({func}())"
        out[name] = [sys.executable, "-c", code]
    return out


COMMANDS = {
    **{f"tools/{f.name}": [sys.executable, str(f)] for f in sorted((ROOT / "tools").glob("*.py"))},
    "train.py": [sys.executable, str(ROOT / "train.py")],
    **console_scripts(),
}
NEEDS = {"mor-lm-eval": "lm_eval"}  # optional extras


def wall(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return time.perf_counter() - start, proc


def test_the_table_holds_every_command():
    assert len(COMMANDS) > 15 and "mor-lm-eval" in COMMANDS and "tools/estimate.py" in COMMANDS


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_is_quick(name):
    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        pytest.skip(f"needs {NEEDS[name]}")
    seen = []
    for _ in range(TRIES):
        startup, _ = wall([sys.executable, "-c", "pass"])  # measured next to the command, under the same load
        limit = max(0.5, 5 * startup)
        took, proc = wall([*COMMANDS[name], "--help"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith("usage: "), proc.stdout[:500]
        seen.append(f"{took:.2f} s (limit {limit:.2f} s)")
        if took < limit:
            return
    pytest.fail(f"{name} --help took {', '.join(seen)}: import heavy modules after parsing the arguments")

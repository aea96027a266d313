"""Command lines answer --help without loading the package (and torch): their help comes back at once,
and the choices they list without it are the package's own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import tools_module
from test_train import ROOT

PROBE = """
import json, runpy, sys
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code or 0
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "package": "mor_pretrain" in sys.modules}))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["train.py", "--help"],
        ["tools/eval.py", "--help"],
        ["tools/generate.py", "--help"],
        ["tools/convert_checkpoint.py", "--help"],
        ["tools/convert_checkpoint.py", "upcycle", "--help"],
        ["tools/flops.py", "--help"],
        ["tools/isoflop.py", "plan", "--help"],
        ["tools/plot_routing.py", "--help"],
        ["tools/estimate.py", "--help"],
        ["tools/pretokenize.py", "--help"],
        ["tools/train_tokenizer.py", "--help"],
    ],
    ids=lambda argv: " ".join(argv[0:2]).removeprefix("tools/"),
)
def test_help_loads_no_torch(argv):
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "torch": False, "package": False}, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_choices_listed_without_the_package_are_the_packages():
    from mor_pretrain import convert, evaluate, folders

    tool = tools_module("convert_checkpoint")
    assert tuple(folders.DTYPES) == tool.DTYPE_NAMES and tool.STRATEGIES == convert.UPCYCLE_STRATEGIES
    from mor_pretrain import estimate

    assert tuple(estimate.GPUS) == tools_module("isoflop").GPU_NAMES
    proc = subprocess.run([sys.executable, "tools/eval.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    listed = " ".join(proc.stdout.split())
    assert all(task in listed for task in evaluate.TASKS), listed

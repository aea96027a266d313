"""The first 20 training losses of the debug configs, bit for bit (tools/golden_losses.py, whose --write
regenerates the file on purpose). Catches the silent numerics changes that tolerant tests let through."""

from __future__ import annotations

import json

import pytest
from conftest import tools_module

pytestmark = pytest.mark.slow  # three 20-step single-process runs: about a minute on 2 cores


def test_debug_config_losses_equal_the_golden_file_bit_for_bit():
    golden_losses = tools_module("golden_losses")
    golden = json.loads(golden_losses.GOLDEN.read_text())
    here = golden_losses.environment()
    recorded = {k: golden[k] for k in here}
    if here != recorded:
        pytest.skip(f"the golden file was made with {recorded}, this is {here}: floats may differ legitimately")
    assert golden["steps"] == golden_losses.STEPS and set(golden["losses"]) == set(golden_losses.CONFIGS)
    losses = golden_losses.measure()
    for kind, want in golden["losses"].items():
        assert losses[kind] == want, (
            f"{kind}: the losses changed (first at step "
            f"{next(i + 1 for i, (a, b) in enumerate(zip(losses[kind], want, strict=True)) if a != b)}); if "
            f"the change is intended, regenerate with `python tools/golden_losses.py --write`"
        )

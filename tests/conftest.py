import pytest
import torch

from mor_pretrain.models import ModelArgs, MoRModel


def tiny_args(**kw) -> ModelArgs:
    base = dict(
        vocab_size=97,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        d_ffn=64,
        max_seq_len=64,
        n_layers=8,
        num_recursions=3,
        sharing="middle_cycle",
    )
    base.update(kw)
    return ModelArgs(**base)


def tiny_model(seed: int = 0, **kw) -> MoRModel:
    torch.manual_seed(seed)
    model = MoRModel(tiny_args(**kw))
    model.init_weights()
    return model


@pytest.fixture(autouse=True)
def _fp32_deterministic():
    torch.manual_seed(0)
    yield

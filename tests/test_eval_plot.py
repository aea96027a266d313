import pytest
import torch
from conftest import tiny_model, tools_module

plot_routing = tools_module("plot_routing")


class ByteTok:
    """Printable ASCII characters as tokens: enough to drive a 97-token tiny model."""

    vocab_size = 97
    eos_id = 0

    def encode(self, text, *, bos=False, eos=False):
        return [min(max(ord(c) - 32, 0), 96) for c in text]

    def decode(self, ids):
        return "".join(chr(i + 32) for i in ids)


def test_token_types():
    got = [plot_routing.token_type(p) for p in [" the", "ness", " 42", ",", " \n", "'s"]]
    assert got == ["word start", "word piece", "number", "punctuation", "whitespace", "word piece"]


@pytest.mark.parametrize("routing", ["causal", "topk"])
def test_trace_matches_the_model_and_candidate_counts(routing):
    model = tiny_model(router="expert").eval()
    text = "Alas, poor Yorick! I knew him, Horatio: a fellow"
    trace = plot_routing.trace_routing(model, ByteTok(), text, routing)
    with torch.no_grad():
        ref = model(torch.tensor([ByteTok().encode(text)]), routing=routing).depth[0]
    assert trace.depth.tolist() == ref.tolist() and "".join(trace.pieces) == text
    t = len(text)
    candidates = (
        [t, *model.args.tokens_per_step(t)[:-1]] if routing == "topk" else [int((ref >= r).sum()) for r in range(3)]
    )
    assert [len(s) for s in trace.scores] == candidates
    assert all(((s > 0) & (s < 1)).all() for s in trace.scores)


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    model = tiny_model(router="token").eval()
    trace = plot_routing.trace_routing(model, ByteTok(), "To be, or not to be, that is the question: whether", "causal")
    depth_png = plot_routing.plot_depth_text(trace, tmp_path / "d.png")
    for path in (depth_png, plot_routing.plot_stats(trace, tmp_path / "s.png")):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with pytest.raises(ValueError, match="no router"):
        plot_routing.trace_routing(tiny_model(), ByteTok(), "x", "causal")

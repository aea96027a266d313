"""A routing rule has one name, ModelArgs.router_kind, and every place that describes a model names the rule
by it: the transformers model card, the isoFLOP label and generation's refusal of a threshold; and every
equality table of the tests (the variants a test runs through two paths and compares) holds every rule. The
router and rule values are read from ModelArgs' own type annotations, so a new rule is checked here without
edits."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import typing
from collections.abc import Callable

import pytest
import torch
from conftest import tiny_args

from mor_pretrain.generate import DepthControl
from mor_pretrain.integrations.hf import model_card
from mor_pretrain.isoflop import model_variant
from mor_pretrain.models import ModelArgs, MoRModel


def allowed(name: str) -> tuple[str, ...]:
    """The values the config accepts for a Literal-typed ModelArgs field (config._coerce checks the same)."""
    tp = typing.get_type_hints(ModelArgs)[name]
    assert typing.get_origin(tp) is typing.Literal, f"ModelArgs.{name} is no longer a Literal: update this test"
    return typing.get_args(tp)


def model_kinds() -> list[ModelArgs]:
    """Every valid combination of router, expert rule and (for router none) recursion or not."""
    found = []
    for router, rule, nr in itertools.product(allowed("router"), allowed("expert_rule"), (1, 2)):
        args = tiny_args(router=router, expert_rule=rule, num_recursions=nr, n_layers=6)
        try:
            args.validate()
        except ValueError:
            continue
        found.append(args)
    return found


KINDS = model_kinds()


def test_every_router_and_rule_has_a_name_of_its_own():
    names = {
        (a.router, a.expert_rule if a.router == "expert" else "", a.num_recursions > 1): a.router_kind for a in KINDS
    }
    # Each router, and each rule of expert choice, is reached by some valid model.
    assert {a.router for a in KINDS} == set(allowed("router"))
    assert {a.expert_rule for a in KINDS if a.router == "expert"} == set(allowed("expert_rule"))
    assert len(set(names.values())) == len(names), f"two kinds of model share a name: {names}"
    for (router, rule, _), kind in names.items():
        if router != "none":
            assert router in kind and rule in kind, (router, rule, kind)
    assert {"vanilla", "recursive", "expert-topk", "expert-threshold", "expert-random", "token"} <= set(names.values())


@pytest.mark.parametrize("args", KINDS, ids=[a.router_kind for a in KINDS])
def test_the_model_card_and_the_isoflop_label_name_the_rule(args):
    config = {"model_type": "mor", "dtype": "float32", "transformers_version": "0"}
    card = model_card(args, config, 1000, {})
    assert f"; {args.router_kind}" in card or f"Mixture-of-Recursions: {args.router_kind} routing" in card
    label = model_variant(args)
    assert label.split(" Nr=")[0].removeprefix("MoR ") == args.router_kind, label
    if args.router == "expert":
        # Expert choice that keeps every token: the recursive family, its gate still named by the rule.
        gated = dataclasses.replace(args, capacities=[1.0] * args.num_recursions)
        assert f"({gated.router_kind} router gate)" in model_variant(gated)


@pytest.mark.parametrize("args", KINDS, ids=[a.router_kind for a in KINDS])
def test_generation_names_the_rule_when_it_refuses_a_threshold(args):
    model = MoRModel(args)  # validate reads the args only: no weights needed
    ctl = DepthControl(threshold=0.4)
    if args.topk_routing:
        ctl.validate(model)  # the one kind with a fixed causal threshold to move
        return
    with pytest.raises(ValueError, match="fixed causal threshold") as e:
        ctl.validate(model)
    assert f"this model's router is {args.router_kind}" in str(e.value)
    assert "expert-topk" in str(e.value)  # and the kind that has one


# The equality tables: module-level variant lists that a test runs through two paths and compares. A kind that
# one of them lacks is compared by none of its tests, so every kind in KINDS must be in every table, or be
# exempted by it with the reason and a check, run here against the code, that the reason holds: for a path that
# refuses the kind, `refused(path)` (e.g. "expert-x": ("<why>", refused(lambda m: DepthBatchEngine(m, 1, 8)))).
Exemptions = dict[str, tuple[str, Callable[[ModelArgs], None]]]


def refused(path: Callable[[MoRModel], object]) -> Callable[[ModelArgs], None]:
    """An exemption's check for a path that refuses the kind: calling it on a model of that kind raises."""

    def check(args: ModelArgs) -> None:
        with pytest.raises(ValueError):
            path(MoRModel(args))

    return check


def unrouted(args: ModelArgs) -> None:
    """The check of a kind without a router: its forward returns no routing losses, statistics or sums."""
    out = MoRModel(args)(torch.randint(0, args.vocab_size, (2, 16)))
    assert not (out.aux_losses or out.side_losses or out.stats or out.router_sums), args.router_kind


UNROUTED = "no router: nothing of routing's is logged to compare across layouts (FSDP == one process runs it)"


def fresh_draws(args: ModelArgs) -> None:
    """The check of a kind whose scores are random draws: the same input routes alike after the same seed
    only, so two paths that draw in another order (token by token, per rank) cannot agree value for value."""
    model = MoRModel(args)
    x = torch.randint(0, args.vocab_size, (2, 16))
    depths = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        depths.append(model(x).depth)
    assert torch.equal(depths[0], depths[1]) and not torch.equal(depths[0], depths[2]), args.router_kind


RANDOM = (
    "scores are fresh random draws (the MoR authors' rand_router): this path draws them in another order "
    "than the one it is compared with, so they agree in distribution, not value; its model tests seed both",
    fresh_draws,
)


def table(module: str, name: str) -> typing.Any:
    return getattr(importlib.import_module(module), name)


def tiny(module: str, name: str) -> list[ModelArgs]:
    """A table of ModelArgs overrides, built as its tests build them (conftest.tiny_model: tiny_args)."""
    return [tiny_args(**kw) for kw in table(module, name).values()]


def fsdp(names: typing.Iterable[str]) -> list[ModelArgs]:
    return [table("test_parallel", "make_cfg")(v).model for v in names]


# name: (what its tests compare, the table's models, exemptions)
TABLES: dict[str, tuple[str, Callable[[], list[ModelArgs]], Exemptions]] = {
    "test_model.VARIANTS": ("gradients reach every parameter", lambda: tiny("test_model", "VARIANTS"), {}),
    "test_model.CAUSAL": (
        "a future token never changes past logits",
        lambda: [tiny_args(**table("test_model", "VARIANTS")[v]) for v, _ in table("test_model", "CAUSAL")],
        {},
    ),
    "test_generate.KINDS": (
        "cached == uncached decoding",
        lambda: tiny("test_generate", "KINDS"),
        {"expert-random": RANDOM},
    ),
    "test_generate_serving.KINDS": (
        "serving engine == generate",
        lambda: tiny("test_generate_serving", "KINDS"),
        {"expert-random": RANDOM},
    ),
    "test_hf.KINDS": ("transformers folder == ours", lambda: tiny("test_hf", "KINDS"), {}),
    "test_config_flops.FLOP_MODELS": (
        "flops.py == FlopCounterMode",
        lambda: tiny("test_config_flops", "FLOP_MODELS"),
        {},
    ),
    "test_syncs.VARIANTS": (
        "host syncs == estimate.DOCUMENTED_SYNCS",
        lambda: [table("test_syncs", "config")(v).model for v in table("test_syncs", "VARIANTS")],
        {},
    ),
    "test_parallel.VARIANTS": (
        "FSDP == one process",
        lambda: fsdp(table("test_parallel", "VARIANTS")),
        {"expert-random": RANDOM},
    ),
    "test_parallel.LAYOUT_VARIANTS": (
        "every logged scalar on 1 rank == dp2 == dp2 x tp2",
        lambda: fsdp(table("test_parallel", "LAYOUT_VARIANTS")),
        {"vanilla": (UNROUTED, unrouted), "recursive": (UNROUTED, unrouted), "expert-random": RANDOM},
    ),
}


@pytest.mark.parametrize("name", TABLES)
def test_every_equality_table_has_every_routing_kind(name):
    compares, variants, exempt = TABLES[name]
    kinds = {a.router_kind: a for a in KINDS}
    have = {a.router_kind for a in variants()}
    assert set(exempt) <= set(kinds), f"{name} exempts kinds the config no longer allows: {set(exempt) - set(kinds)}"
    for kind, (reason, check) in exempt.items():
        assert kind not in have, f"{name} runs {kind}, which it exempts ({reason}): drop the exemption"
        check(kinds[kind])
    missing = sorted(set(kinds) - have - set(exempt))
    assert not missing, (
        f"{name} ({compares}) lacks the routing kind(s) {missing}: add a variant of each to it, or exempt the "
        "kind in tests/test_router_names.py TABLES with its reason and a check that the path refuses it"
    )


def test_an_exemption_holds_only_where_the_path_refuses():
    from mor_pretrain.serving import DepthBatchEngine

    engine = refused(lambda m: DepthBatchEngine(m, slots=1, max_len=8))
    engine(tiny_args(sharing="middle_sequence"))  # the engine refuses sequence sharing
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        engine(tiny_args(router="expert"))
    with pytest.raises(AssertionError):
        unrouted(tiny_args(router="token"))

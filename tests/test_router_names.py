"""A routing rule has one name, ModelArgs.router_kind, and every place that describes a model names the rule
by it: the transformers model card, the isoFLOP label and generation's refusal of a threshold. The router
and rule values are read from ModelArgs' own type annotations, so a new rule is checked here without edits."""

from __future__ import annotations

import dataclasses
import itertools
import typing

import pytest
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
    assert {"vanilla", "recursive", "expert-topk", "expert-threshold", "token"} <= set(names.values())


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

"""Datasets for the task configs beside this file: the rows lm-eval's own tasks read, from the local evaluation
data (mor_pretrain.evaluate.task_rows), so those tasks run without the network. Referenced from the YAML files
as `custom_dataset: !function local.<task>`; lm-eval passes the task's metadata and dataset_kwargs."""

from typing import Any

import datasets  # type: ignore[import-untyped]

from mor_pretrain.evaluate import LM_EVAL_TASKS, task_rows


def _splits(task: str, splits: list[str], subject: str | None = None) -> datasets.DatasetDict:
    return datasets.DatasetDict({s: datasets.Dataset.from_list(task_rows(task, s, subject)) for s in splits})


def _with_empty_train(task: str) -> datasets.DatasetDict:
    """The evaluated split and an empty train split: lm-eval reads its few-shot source when it builds the
    task, and its few-shot examples come from train, which the local data lacks. So 0-shot runs as lm-eval's,
    and a few-shot run fails instead of drawing examples from elsewhere."""
    found = _splits(task, [LM_EVAL_TASKS[task][1]])
    found["train"] = next(iter(found.values())).select([])
    return found


def lambada(**_: Any) -> datasets.DatasetDict:
    return _splits("lambada", [LM_EVAL_TASKS["lambada"][1]])


def hellaswag(**_: Any) -> datasets.DatasetDict:
    return _with_empty_train("hellaswag")


def piqa(**_: Any) -> datasets.DatasetDict:
    return _with_empty_train("piqa")


def winogrande(**_: Any) -> datasets.DatasetDict:
    return _with_empty_train("winogrande")


def arc_easy(**_: Any) -> datasets.DatasetDict:
    return _with_empty_train("arc_easy")


def arc_challenge(**_: Any) -> datasets.DatasetDict:
    return _with_empty_train("arc_challenge")


def mmlu(subject: str, **_: Any) -> datasets.DatasetDict:
    return _splits("mmlu", ["test", "dev"], subject)

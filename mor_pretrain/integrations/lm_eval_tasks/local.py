"""Datasets for the task configs beside this file: the rows lm-eval's own tasks read, from the local evaluation
data (mor_pretrain.evaluate.task_rows), so those tasks run without the network. Referenced from the YAML files
as `custom_dataset: !function local.<task>`; lm-eval passes the task's metadata and dataset_kwargs.

The few-shot samplers here (`fewshot_config: {sampler: !function local.<Task>Shots}`) are lm-eval's own; they
refuse, with a ShotsUnsupported naming what is supported, a --num_fewshot the local data cannot serve (where
lm-eval's own would fail on an assertion). `mor-lm-eval` prints that as one `error:` line."""

from typing import Any

import datasets  # type: ignore[import-untyped]
from lm_eval.api.samplers import ContextSampler, FirstNSampler

from mor_pretrain.evaluate import LM_EVAL_TASKS, ShotsUnsupported, task_rows


def _splits(task: str, splits: list[str], subject: str | None = None) -> datasets.DatasetDict:
    return datasets.DatasetDict({s: datasets.Dataset.from_list(task_rows(task, s, subject)) for s in splits})


def _with_empty_train(task: str) -> datasets.DatasetDict:
    """The evaluated split and an empty train split: lm-eval reads its few-shot source when it builds the
    task, and its few-shot examples come from train, which the local data lacks. So 0-shot runs as lm-eval's,
    and a few-shot run is refused (`_no_shots`) instead of drawing examples from elsewhere."""
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


def _no_shots(task: str) -> type[ContextSampler]:
    """lm-eval's default sampler for a task whose few-shot source (its train split) the local data lacks: any
    --num_fewshot above 0 is refused."""
    name = LM_EVAL_TASKS[task][0]

    class NoShots(ContextSampler):
        def sample(self, n: int, eval_doc: Any = None, df: Any = None, **kwargs: Any) -> Any:
            if n > 0:
                raise ShotsUnsupported(
                    f"{name}_local: --num_fewshot {n}: lm-eval draws few-shot examples from {name}'s train "
                    "split, which the local data lacks, so it runs 0-shot only (mmlu_continuation_local takes "
                    "0..5 from its dev split, lambada_openai_local draws from its test split as lm-eval's does)"
                )
            return super().sample(n, eval_doc, df, **kwargs)

    NoShots.__name__ = NoShots.__qualname__ = f"{task.title().replace('_', '')}Shots"
    return NoShots


HellaswagShots = _no_shots("hellaswag")
PiqaShots = _no_shots("piqa")
WinograndeShots = _no_shots("winogrande")
ArcEasyShots = _no_shots("arc_easy")
ArcChallengeShots = _no_shots("arc_challenge")


class MmluShots(FirstNSampler):
    """lm-eval's first_n sampler over a subject's dev split (5 rows), refusing more shots than it holds."""

    def sample(self, n: int, eval_doc: Any = None, df: Any = None, **kwargs: Any) -> Any:
        if n > len(self.df):
            raise ShotsUnsupported(
                f"mmlu_continuation_local: --num_fewshot {n}: its examples are the first of each subject's dev "
                f"split, which holds {len(self.df)}, so it takes 0..{len(self.df)}"
            )
        return super().sample(n, eval_doc, df, **kwargs)

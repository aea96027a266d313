"""isoFLOP studies: plan runs from FLOP budgets, then collect their results into a table and plots.

Planning follows the paper: a budget in the paper's FLOP convention buys tokens, hence optimizer steps at a
fixed global batch, under a warmup-stable-decay (trapezoid) schedule. Smaller budgets of the same config
reuse the largest run ("trapezoid reuse"): a smaller run shares the big run's warmup and stable phase, so it
is only a cooldown branched from the big run's checkpoint at the step where its own decay begins.

Reporting reads what runs leave behind (the run folder contract): `config.toml`, TensorBoard scalars in
`tb/` and evaluation results in `eval/*.json`. Validation losses come in two routing modes (trainer.validate):
val/loss_causal, comparable across families and what a deployed model gets, and val/loss_topk, expert
choice's training-time top-k (the paper's protocol, which sees future tokens); the two are equal for models
without expert choice.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mor_pretrain.config import TRAIN_LOSS, VAL_LOSS, JobConfig, RunFolder, dump_toml, load_config
from mor_pretrain.flops import budget, executed_flops_per_token, paper_flops_per_token
from mor_pretrain.models.mor import ModelArgs

PLAN_FILE = "plan.json"
FAMILY_ORDER = ("vanilla", "recursive", "mor")

# ----------------------------------------------------------------------------------------------------
# planning


@dataclass
class RunPlan:
    """One planned training run; `branch_from`/`branch_step` are set for trapezoid cooldowns."""

    name: str
    family: str
    source: str  # the config file the run was planned from
    budget: float  # the FLOP budget (paper convention) this run stands for
    steps: int
    warmup_steps: int
    decay_steps: int
    global_batch_size: int
    seq_len: int
    tokens: int  # tokens actually trained: steps x global batch x seq_len
    paper_flops_per_token: float
    executed_flops_per_token: float
    params: int  # unique parameters (shared weights counted once)
    non_embedding_params: int
    run_dir: str
    branch_from: str | None = None  # name of the run whose checkpoint this cooldown starts from
    branch_step: int | None = None  # that checkpoint's step (where this run's decay begins)
    save_steps: list[int] = field(default_factory=list)  # extra checkpoints other runs branch from
    config: str = ""  # written TOML, relative to the plan folder
    variant: str = ""  # model_variant
    seed: int = 0  # training.seed
    lr: float | None = None  # optimizer.lr, the peak learning rate (None in plans written before it was kept)

    @property
    def flops_paper(self) -> float:
        return self.tokens * self.paper_flops_per_token

    @property
    def flops_executed(self) -> float:
        return self.tokens * self.executed_flops_per_token


def model_family(args: ModelArgs) -> str:
    """vanilla (no recursion), recursive (fixed depth: no router, or expert choice that keeps every token)
    or mor (routed)."""
    if args.num_recursions == 1:
        return "vanilla"
    fixed = args.router == "none" or (args.router == "expert" and min(args.step_capacities) >= 1.0)
    return "recursive" if fixed else "mor"


def model_variant(args: ModelArgs) -> str:
    """The family with what tells its members apart: vanilla, recursive Nr=2, recursive Nr=2 (expert-topk
    router gate), MoR expert-topk Nr=3 (KV share), MoR expert-threshold Nr=2 (alpha 1). The router and its
    rule are named by ModelArgs.router_kind, never worked out here again."""
    family = model_family(args)
    if family == "vanilla":
        return family
    kind = "recursive" if family == "recursive" else f"MoR {args.router_kind}"
    notes = []
    if family == "recursive" and args.router != "none":
        notes.append(f"{args.router_kind} router gate")
    if args.recursion_gate:
        notes.append(f"gate {args.recursion_gate:g}")
    if args.residual_scale:
        notes.append(f"residual scale {args.residual_scale:g}")
    if args.router != "none" and args.router_alpha != ModelArgs.router_alpha:
        notes.append(f"alpha {args.router_alpha:g}")
    if args.kv_mode == "share":
        notes.append("KV share")
    return f"{kind} Nr={args.num_recursions}" + (f" ({', '.join(notes)})" if notes else "")


def resolved_model_args(cfg: JobConfig) -> ModelArgs:
    """The config's model args with vocab_size = 0 replaced by the tokenizer's padded size."""
    args = copy.deepcopy(cfg.model)
    if args.vocab_size == 0:
        from mor_pretrain.data.tokenizer import resolve_vocab_size

        args.vocab_size = resolve_vocab_size(cfg.data)
    return args


def count_params(args: ModelArgs) -> tuple[int, int]:
    """(unique, non-embedding) parameter counts, from a model built on the meta device."""
    import torch

    from mor_pretrain.models import MoRModel

    with torch.device("meta"):
        model = MoRModel(args)
    return model.num_params(), model.num_params(exclude_embedding=True)


def wsd_steps(steps: int, warmup_fraction: float, decay_fraction: float) -> tuple[int, int]:
    """(warmup, decay) steps of a warmup-stable-decay schedule: each fraction x steps, rounded."""
    return round(warmup_fraction * steps), round(decay_fraction * steps)


def step_fraction(n: int, steps: int) -> float:
    """A fraction f with floor(f * steps) == round(f * steps) == n, whichever way a trainer rounds."""
    f = n / steps
    while math.floor(f * steps) < n:  # n / steps * steps can land one ulp below n
        f = math.nextafter(f, 1.0)
    return f


def budget_tag(flops: float) -> str:
    """A compact budget label for run names: 2e18, 1.65e19, 5e9."""
    mantissa, _, exponent = f"{flops:.3g}".partition("e")
    return mantissa + (f"e{int(exponent)}" if exponent else "")


def plan_config(cfg: JobConfig, source: str, budgets: list[float]) -> list[RunPlan]:
    """Runs for one config: the largest budget first, then the smaller ones as cooldowns branched from it.

    A smaller run branches from the big run at its own decay start (steps - decay), which must lie in the big
    run's stable phase; otherwise (or without a wsd schedule) it is planned as an independent run.
    """
    if not budgets or any(b <= 0 for b in budgets):
        raise ValueError(f"budgets must be positive FLOP counts, got {budgets}")
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"budgets must be distinct, got {budgets}")
    t, opt = cfg.training, cfg.optimizer
    args = resolved_model_args(cfg)
    fpt_paper = paper_flops_per_token(args, t.seq_len)
    fpt_exec = executed_flops_per_token(args, t.seq_len)
    params, non_emb = count_params(args)
    batch_tokens = t.global_batch_size * t.seq_len
    runs: list[RunPlan] = []
    for b in sorted(budgets, reverse=True):
        steps = budget(fpt_paper, b, batch_tokens).steps
        if steps < 1:
            raise ValueError(f"{source}: budget {b:.3g} FLOPs buys no optimizer step at {batch_tokens} tokens/step")
        name = f"{cfg.name}_{budget_tag(b)}"
        warmup, decay = wsd_steps(steps, opt.warmup_fraction, opt.decay_fraction)
        run = RunPlan(
            name=name,
            family=model_family(args),
            variant=model_variant(args),
            seed=t.seed,
            lr=opt.lr,
            source=source,
            budget=b,
            steps=steps,
            warmup_steps=warmup,
            decay_steps=decay,
            global_batch_size=t.global_batch_size,
            seq_len=t.seq_len,
            tokens=steps * batch_tokens,
            paper_flops_per_token=fpt_paper,
            executed_flops_per_token=fpt_exec,
            params=params,
            non_embedding_params=non_emb,
            run_dir=str(Path(cfg.run_root) / name),
        )
        if runs and opt.schedule == "wsd":
            _branch(runs[0], run)
        runs.append(run)
    return runs


def _branch(big: RunPlan, small: RunPlan) -> None:
    """Make `small` a cooldown of `big` if its decay starts inside big's warmup-free, decay-free stretch."""
    start = small.steps - small.decay_steps
    if not big.warmup_steps <= start <= big.steps - big.decay_steps or start < 1 or start == small.steps:
        return
    small.warmup_steps = big.warmup_steps  # the shared trunk warmed up once, for the big run
    small.branch_from, small.branch_step = big.name, start
    if start not in big.save_steps:
        big.save_steps.append(start)
        big.save_steps.sort()


def seeded(cfg: JobConfig, seed: int) -> JobConfig:
    """The config with training.seed = seed, named <name>_s<seed>."""
    out = copy.deepcopy(cfg)
    out.name, out.training.seed = f"{cfg.name}_s{seed}", seed
    return out


def at_lr(cfg: JobConfig, lr: float) -> JobConfig:
    """The config with optimizer.lr = lr, named <name>_lr<lr>."""
    out = copy.deepcopy(cfg)
    out.name, out.optimizer.lr = f"{cfg.name}_lr{lr:g}", lr
    return out


def plan_sweep(
    configs: list[tuple[str, JobConfig]],
    budgets: list[float],
    seeds: list[int] | None = None,
    lrs: list[float] | None = None,
) -> list[RunPlan]:
    """Plan every (source path, config) pair over the budgets, at each peak learning rate of `lrs` when given
    (names get _lr<lr>), and over `seeds` when given (each seed's runs named <name>_s<seed>_<budget>, its
    cooldowns branched from its own big run), seed by seed; names must be unique."""
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0):
        raise ValueError(f"seeds must be distinct non-negative integers, got {seeds}")
    if lrs is not None and (not lrs or len(set(lrs)) != len(lrs) or not all(0 < lr < math.inf for lr in lrs)):
        raise ValueError(f"learning rates must be distinct positive numbers, got {lrs}")
    if lrs is not None:
        configs = [(src, at_lr(cfg, lr)) for src, cfg in configs for lr in lrs]
    pairs = configs if seeds is None else [(src, seeded(cfg, s)) for s in seeds for src, cfg in configs]
    runs = [r for source, cfg in pairs for r in plan_config(cfg, source, budgets)]
    seen: dict[str, str] = {}
    for r in runs:
        if r.name in seen:
            raise ValueError(
                f"run name {r.name} planned twice ({seen[r.name]} and {r.source}); give the configs distinct names"
            )
        seen[r.name] = r.source
    return runs


def run_job_config(cfg: JobConfig, run: RunPlan, runs: list[RunPlan]) -> JobConfig:
    """The ready-to-run config of `run`: its name, steps, a schedule matching the plan, its checkpoints."""
    out = copy.deepcopy(cfg)
    out.name = run.name
    out.training.seed = run.seed
    if run.lr is not None:
        out.optimizer.lr = run.lr
    out.training.steps = run.steps
    out.optimizer.warmup_fraction = step_fraction(run.warmup_steps, run.steps)
    out.optimizer.decay_fraction = step_fraction(run.decay_steps, run.steps)
    out.checkpoint.save_steps = list(run.save_steps)
    if run.branch_from is not None and run.branch_step is not None:
        from mor_pretrain.folders import step_dir

        big = next(r for r in runs if r.name == run.branch_from)
        big_checkpoints = RunFolder(Path(big.run_dir), cfg.checkpoint.folder).checkpoints
        out.checkpoint.init_from = str(step_dir(big_checkpoints, run.branch_step))
    out.validate()
    return out


def write_plan(out_dir: str | Path, runs: list[RunPlan], configs: dict[str, JobConfig]) -> Path:
    """Write one TOML per run (in run order) and plan.json listing them; `configs` maps source -> config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for r in runs:
        r.config = f"{r.name}.toml"
        (out / r.config).write_text(dump_toml(run_job_config(configs[r.source], r, runs)))
    entries = [
        {**dataclasses.asdict(r), "flops_paper": r.flops_paper, "flops_executed": r.flops_executed} for r in runs
    ]
    path = out / PLAN_FILE
    path.write_text(json.dumps({"runs": entries}, indent=2) + "\n")
    return path


def load_plan(plan_dir: str | Path) -> list[RunPlan]:
    """Read plan.json back into RunPlan objects."""
    path = Path(plan_dir) / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: write a plan with `tools/isoflop.py plan ... --out {plan_dir}`")
    names = {f.name for f in dataclasses.fields(RunPlan)}
    return [RunPlan(**{k: v for k, v in e.items() if k in names}) for e in json.loads(path.read_text())["runs"]]


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def plan_table(runs: list[RunPlan]) -> str:
    """The plan as a markdown table."""
    head = (
        "| run | variant | budget | FLOPs/token paper | FLOPs/token executed | tokens | steps | warmup | decay "
        "| params | non-emb params | branch |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in runs:
        branch = f"{r.branch_from} @ {r.branch_step}" if r.branch_from else "-"
        if r.save_steps:
            branch += f" (saves {', '.join(map(str, r.save_steps))})"
        lines.append(
            f"| {r.name} | {r.variant or r.family} | {r.budget:.3g} | {_si(r.paper_flops_per_token)} | "
            f"{_si(r.executed_flops_per_token)} | {_si(r.tokens)} | {r.steps} | {r.warmup_steps} | {r.decay_steps} | "
            f"{_si(r.params)} | {_si(r.non_embedding_params)} | {branch} |"
        )
    return "\n".join(lines)


def step_seconds(cfg: JobConfig, gpu: str, world: int) -> float:
    """The dry run's predicted step time of `cfg` on `world` GPUs of kind `gpu` (mor_pretrain.estimate)."""
    from mor_pretrain.estimate import GPUS, estimate, predict

    sized = copy.deepcopy(cfg)
    sized.model = resolved_model_args(cfg)
    return predict(estimate(sized, world), GPUS[gpu], cfg.training.dtype).step_s


def gpu_hours(run: RunPlan, step_s: float, world: int) -> float:
    """The steps a run trains (a cooldown starts at its branch step) x a step's time x the GPUs, in hours."""
    return (run.steps - (run.branch_step or 0)) * step_s * world / 3600


def gpu_hours_table(runs: list[RunPlan], seconds: dict[str, float], gpu: str, world: int) -> str:
    """Predicted GPU-hours per run and for the whole sweep; `seconds` holds each source config's step time."""
    lines = [f"| run | steps trained | step s ({world} x {gpu}) | GPU-hours |", "|---|---|---|---|"]
    for r in runs:
        hours = gpu_hours(r, seconds[r.source], world)
        lines.append(f"| {r.name} | {r.steps - (r.branch_step or 0)} | {seconds[r.source]:.2f} | {hours:,.1f} |")
    total = sum(gpu_hours(r, seconds[r.source], world) for r in runs)
    lines.append(f"| sweep | | | {total:,.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# reporting


@dataclass
class Curve:
    """Validation losses over training, with the FLOPs (paper convention) and tokens spent at each point."""

    steps: list[int]
    flops: list[float]
    tokens: list[float]
    val_loss_causal: list[float]
    val_loss_topk: list[float | None]  # None where a step logged no top-k loss


@dataclass
class RunResult:
    name: str
    family: str
    variant: str  # model_variant: what the plots and tables group by
    run_dir: str
    params: int
    non_embedding_params: int
    step: int  # last step with a logged scalar
    flops: float  # paper-convention FLOPs spent by that step
    tokens: float
    val_loss_causal: float | None  # the last val/loss_causal logged
    val_loss_topk: float | None  # val/loss_topk at that step
    val_step: int | None  # the step they were logged at
    train_loss: float | None
    seed: int  # training.seed
    # Mean recursion steps per token where routing decides per token: at the last validation (causal
    # routing) and at the last logged training step (token choice, expert-threshold); None elsewhere.
    val_mean_depth: float | None
    train_mean_depth: float | None
    eval_acc: dict[str, float]  # routing ("topk", "causal", "-") -> few-shot average (suite_average)
    eval_tasks: int
    wall_s: float  # from the run's first to its last logged scalar (training and validation, this run only)
    curve: Curve


def _read_tb(tb_dir: str | Path) -> tuple[dict[str, dict[int, float]], float]:
    """Every scalar tag as {tag: {step: value}} (a step logged again keeps the last), and the seconds from
    the first scalar event to the last."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = Path(tb_dir)
    if not path.is_dir() or not any(path.glob("**/events.out.tfevents.*")):
        raise FileNotFoundError(f"no TensorBoard event files in {path}")
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    events = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}
    times = [e.wall_time for evs in events.values() for e in evs]
    wall = max(times) - min(times) if times else 0.0
    return {tag: {e.step: e.value for e in evs} for tag, evs in events.items()}, wall


def read_scalars(tb_dir: str | Path) -> dict[str, dict[int, float]]:
    """Every scalar tag in a TensorBoard folder as {tag: {step: value}}; a step logged again keeps the last."""
    return _read_tb(tb_dir)[0]


def _at(series: dict[int, float], step: int) -> float | None:
    """The series at `step`, linearly interpolated between logged steps; None outside its range."""
    if step in series:
        return series[step]
    xs = sorted(series)
    if not xs or step < xs[0] or step > xs[-1]:
        return None
    hi = next(i for i, x in enumerate(xs) if x > step)
    x0, x1 = xs[hi - 1], xs[hi]
    return series[x0] + (series[x1] - series[x0]) * (step - x0) / (x1 - x0)


# The paper's few-shot average: accuracy for these, per-character normalized accuracy for the rest (where
# reported); ARC is one task, the mean of its Easy and Challenge sets.
PLAIN_ACC_TASKS = ("lambada", "winogrande", "mmlu")
ARC_SETS = ("arc_easy", "arc_challenge")


def suite_average(results: list[dict[str, Any]]) -> tuple[dict[str, float], int]:
    """({routing ("topk", "causal", "-"): the mean over tasks of each task's accuracy}, tasks counted),
    in the paper's convention (PLAIN_ACC_TASKS, ARC_SETS); metrics other than acc and acc_norm are ignored."""
    best: dict[tuple[str, str], tuple[int, float]] = {}  # (task, routing) -> (preference, value)
    for r in results:
        task, metric = str(r["task"]), str(r["metric"])
        if metric not in ("acc", "acc_norm"):
            continue
        order = int(metric == "acc") if task not in PLAIN_ACC_TASKS else int(metric != "acc")
        key = (task, r.get("routing") or "-")
        if key not in best or order <= best[key][0]:
            best[key] = (order, float(r["value"]))
    per_task: dict[str, dict[str, list[float]]] = {}  # routing -> task -> values
    for (task, routing), (_, value) in best.items():
        per_task.setdefault(routing, {}).setdefault("arc" if task in ARC_SETS else task, []).append(value)
    averages = {k: sum(sum(v) / len(v) for v in tasks.values()) / len(tasks) for k, tasks in per_task.items()}
    return averages, max((len(tasks) for tasks in per_task.values()), default=0)


def read_eval(run_dir: str | Path) -> list[dict[str, Any]]:
    """All results of <run>/eval/*.json, oldest file first, so a later result for the same task wins."""
    results: list[dict[str, Any]] = []
    for path in sorted(RunFolder(Path(run_dir)).eval.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
        try:
            data = json.loads(path.read_text())
            entries = data["results"]
            for e in entries:
                _ = e["task"], e["metric"], e["value"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not an eval result file ({e.__class__.__name__}: {e})") from None
        results.extend(entries)
    return results


def read_run(run_dir: str | Path) -> RunResult:
    """Collect one run folder: its config, TensorBoard scalars and eval results."""
    run = RunFolder.at(run_dir)
    cfg = load_config(run.config)
    args = resolved_model_args(cfg)
    params, non_emb = count_params(args)
    scalars, wall = _read_tb(run.tb)
    # Without logged progress counters, the spend follows from the step: the plan's own arithmetic.
    batch_tokens = cfg.training.global_batch_size * cfg.training.seq_len
    fpt = paper_flops_per_token(args, cfg.training.seq_len)

    def spent(tag: str, step: int, per_token: float) -> float:
        v = _at(scalars.get(tag, {}), step)
        return v if v is not None else step * batch_tokens * per_token

    val, topk = scalars.get(VAL_LOSS["causal"], {}), scalars.get(VAL_LOSS["topk"], {})
    vsteps = sorted(val)
    curve = Curve(
        steps=vsteps,
        flops=[spent("progress/flops_paper", s, fpt) for s in vsteps],
        tokens=[spent("progress/tokens", s, 1.0) for s in vsteps],
        val_loss_causal=[val[s] for s in vsteps],
        val_loss_topk=[topk.get(s) for s in vsteps],
    )
    last = max((max(s) for s in scalars.values() if s), default=0)

    def last_of(tag: str) -> float | None:
        series = scalars.get(tag, {})
        return series[max(series)] if series else None

    averages, tasks = suite_average(read_eval(run.path))
    return RunResult(
        name=cfg.name,
        family=model_family(args),
        variant=model_variant(args),
        run_dir=str(run.path),
        params=params,
        non_embedding_params=non_emb,
        step=last,
        flops=spent("progress/flops_paper", last, fpt),
        tokens=spent("progress/tokens", last, 1.0),
        val_loss_causal=curve.val_loss_causal[-1] if vsteps else None,
        val_loss_topk=curve.val_loss_topk[-1] if vsteps else None,
        val_step=vsteps[-1] if vsteps else None,
        train_loss=last_of(TRAIN_LOSS),
        seed=cfg.training.seed,
        val_mean_depth=last_of("val/causal_mean_depth"),
        train_mean_depth=last_of("routing/mean_depth"),
        eval_acc=averages,
        eval_tasks=tasks,
        wall_s=wall,
        curve=curve,
    )


def _order(r: RunResult) -> tuple[int, str, float, str]:
    return FAMILY_ORDER.index(r.family), r.variant, r.flops, r.name


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _few_shot(r: RunResult) -> str:
    """The few-shot averages in causal and top-k routing; a model without expert choice has one, for both."""
    acc = [r.eval_acc.get(k, r.eval_acc.get("-")) for k in ("causal", "topk")]
    return " | ".join("-" if a is None else f"{100 * a:.1f}%" for a in acc)


def results_table(results: list[RunResult]) -> str:
    """Markdown table of every run: model, variant, params, FLOPs, tokens, final validation losses and
    few-shot averages (causal and top-k routing), train loss, wall time."""
    head = (
        "| model | variant | params | non-emb params | step | FLOPs (paper) | tokens | val loss (causal) "
        "| val loss (top-k) | train loss | few-shot avg (causal) | few-shot avg (top-k) | wall |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(results, key=_order):
        at = f" (step {r.val_step})" if r.val_step not in (None, r.step) else ""  # validated before the end
        lines.append(
            f"| {r.name} | {r.variant} | {_si(r.params)} | {_si(r.non_embedding_params)} | {r.step} | "
            f"{r.flops:.3g} | {_si(r.tokens)} | {_num(r.val_loss_causal)}{at} | {_num(r.val_loss_topk)} | "
            f"{_num(r.train_loss)} | {_few_shot(r)} | {r.wall_s / 60:.1f} min |"
        )
    return "\n".join(lines)


def budget_groups(results: list[RunResult], tolerance: float = 0.05) -> list[list[RunResult]]:
    """Runs grouped by the FLOPs they spent, smallest first: a run within `tolerance` of its group's first
    joins it (runs planned for one budget differ by at most a step's FLOPs)."""
    groups: list[list[RunResult]] = []
    for r in sorted(results, key=lambda r: r.flops):
        if groups and r.flops <= groups[-1][0].flops * (1 + tolerance):
            groups[-1].append(r)
        else:
            groups.append([r])
    return [sorted(g, key=_order) for g in groups]


def budget_tables(results: list[RunResult]) -> str:
    """A markdown table per FLOP budget: variant, unique non-embedding params, tokens, steps, both validation
    losses and the few-shot average in both routing modes (equal without expert choice)."""
    out = []
    for group in budget_groups(results):
        out.append(f"### {group[-1].flops:.2g} FLOPs (paper convention)\n")
        out.append(
            "| model | variant | non-emb params | tokens | steps | val NLL (causal) | val NLL (top-k) "
            "| few-shot avg (causal) | few-shot avg (top-k) |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in group:
            out.append(
                f"| {r.name} | {r.variant} | {_si(r.non_embedding_params)} | {_si(r.tokens)} | {r.step} | "
                f"{_num(r.val_loss_causal)} | {_num(r.val_loss_topk)} | {_few_shot(r)} |"
            )
        out.append("")
    return "\n".join(out).rstrip()


def seed_tables(results: list[RunResult]) -> str:
    """Per FLOP budget, one row per variant over its runs (seeds): n, the mean, sample standard deviation
    and range of the final causal validation loss, and the mean depths; empty when no variant ran twice."""
    groups = budget_groups(results)
    if all(len({r.variant for r in g}) == len(g) for g in groups):
        return ""
    out = []
    for group in groups:
        out.append(f"### {group[-1].flops:.2g} FLOPs (paper convention)\n")
        out.append(
            "| variant | n | seeds | val NLL (causal) mean | sd | min | max | val NLL (top-k) mean "
            "| mean depth at val | mean depth in training |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for variant in dict.fromkeys(r.variant for r in group):
            runs = [r for r in group if r.variant == variant and r.val_loss_causal is not None]
            if not runs:
                continue
            losses = [r.val_loss_causal for r in runs if r.val_loss_causal is not None]
            topk = [r.val_loss_topk for r in runs if r.val_loss_topk is not None]
            mean = sum(losses) / len(losses)
            sd = math.sqrt(sum((x - mean) ** 2 for x in losses) / (len(losses) - 1)) if len(losses) > 1 else None

            def avg(xs: list[float | None]) -> str:
                vals = [x for x in xs if x is not None]
                return f"{sum(vals) / len(vals):.3f}" if vals else "-"

            out.append(
                f"| {variant} | {len(runs)} | {', '.join(str(r.seed) for r in runs)} | {mean:.4f} | {_num(sd)} | "
                f"{min(losses):.4f} | {max(losses):.4f} | {_num(sum(topk) / len(topk) if topk else None)} | "
                f"{avg([r.val_mean_depth for r in runs])} | {avg([r.train_mean_depth for r in runs])} |"
            )
        out.append("")
    return "\n".join(out).rstrip()


def plot_results(results: list[RunResult], out_dir: str | Path) -> list[Path]:
    """val_loss_vs_flops.png and val_loss_vs_tokens.png: each run's causal validation curve (thin) and, per
    variant, a line through the runs' final points; dashed, the same through their top-k losses where these
    differ (expert choice)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'mor-pretrain[plot]'") from None
    with_val = [r for r in results if r.curve.val_loss_causal]
    if not with_val:
        raise ValueError(f"no run has {VAL_LOSS['causal']} scalars in its tb/ folder: nothing to plot")
    variants = sorted({r.variant for r in with_val}, key=lambda v: min(_order(r) for r in with_val if r.variant == v))
    colors = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for axis, label in (("flops", "training FLOPs (paper convention)"), ("tokens", "training tokens")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for variant in variants:
            runs = sorted((r for r in with_val if r.variant == variant), key=lambda r: getattr(r.curve, axis)[-1])
            for r in runs:
                ax.plot(getattr(r.curve, axis), r.curve.val_loss_causal, color=colors[variant], alpha=0.35, lw=1)
            xs = [getattr(r.curve, axis)[-1] for r in runs]
            causal = [r.curve.val_loss_causal[-1] for r in runs]
            ax.plot(xs, causal, "o-", color=colors[variant], label=f"{variant} (causal)")
            topk = [math.nan if r.val_loss_topk is None else r.val_loss_topk for r in runs]
            if any(t != c for t, c in zip(topk, causal, strict=True) if not math.isnan(t)):
                ax.plot(xs, topk, "s--", color=colors[variant], label=f"{variant} (top-k)")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (causal routing; dashed: top-k)")
        ax.set_title(f"validation loss vs {label}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / f"val_loss_vs_{axis}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None) -> tuple[str, list[RunResult]]:
    """Read the runs; with `out_dir`, also write results.md, results.json and the plots there."""
    results = [read_run(d) for d in run_dirs]
    table = f"## All runs\n\n{results_table(results)}\n\n## Per budget\n\n{budget_tables(results)}"
    spread = seed_tables(results)
    if spread:
        table += f"\n\n## Per budget and variant, over seeds\n\n{spread}"
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(table + "\n")
        (out / "results.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2) + "\n")
        plot_results(results, out)
    return table, results


# ----------------------------------------------------------------------------------------------------
# paired seeds: arms compared run for run on the same held-out windows

WINDOWS_FILE = "val_windows.jsonl"  # <run>/eval/: per-window losses, tools/eval.py --tasks val --log-samples


@dataclass
class ArmRun:
    """One seed of one arm: its per-window held-out losses (causal routing) and what else the comparison
    reports."""

    arm: str  # the planned config's name: the run's name without _s<seed>_<budget>
    seed: int
    run_dir: str
    variant: str
    lr: float
    warmup_steps: int
    tokens: float
    windows: list[float]
    trainer_val: float | None  # the trainer's own validation set at the last step (causal)
    gates: dict[str, float]  # routing/gate_mean/<step> and routing/gate_std/<step> at the last logged step
    wall_s: float

    @property
    def loss(self) -> float:
        return sum(self.windows) / len(self.windows)


def arm_name(run_name: str, seed: int) -> str:
    """The arm a planned run belongs to: its name without the _s<seed> and _<budget> that plan_sweep adds."""
    stem, _, _ = run_name.rpartition("_")
    suffix = f"_s{seed}"
    if not stem.endswith(suffix):
        raise ValueError(f"run {run_name} is not named <arm>_s{seed}_<budget> as isoflop plan --seeds names runs")
    return stem.removesuffix(suffix)


def read_windows(run_dir: str | Path) -> list[float]:
    """The causal per-window losses of <run>/eval/val_windows.jsonl, in window order."""
    path = RunFolder(Path(run_dir)).eval / WINDOWS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no per-window losses; write them with tools/eval.py RUN --tasks val --val-text ... "
            f"--limit N --log-samples {path}"
        )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    causal = sorted((r["window"], r["loss"]) for r in rows if r.get("task") == "val" and r["routing"] != "topk")
    if not causal:
        raise ValueError(f"{path}: no causal val windows")
    return [loss for _, loss in causal]


def read_arm_run(run_dir: str | Path) -> ArmRun:
    run = RunFolder.at(run_dir)
    cfg = load_config(run.config)
    scalars, wall = _read_tb(run.tb)
    last = {tag: s[max(s)] for tag, s in scalars.items() if s}
    t = cfg.training
    return ArmRun(
        arm=arm_name(cfg.name, t.seed),
        seed=t.seed,
        run_dir=str(run.path),
        variant=model_variant(resolved_model_args(cfg)),
        lr=cfg.optimizer.lr,
        warmup_steps=round(cfg.optimizer.warmup_fraction * t.steps),
        tokens=t.steps * t.global_batch_size * t.seq_len,
        windows=read_windows(run.path),
        trainer_val=last.get(VAL_LOSS["causal"]),
        gates={k.removeprefix("routing/"): v for k, v in last.items() if k.startswith("routing/gate_")},
        wall_s=wall,
    )


def bootstrap_mean(values: Any, resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a (seeds, windows) array with a 95% percentile interval that resamples both: seeds (training
    noise) and windows (evaluation noise), each with replacement, the same windows for every seed."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or min(x.shape) < 1:
        raise ValueError(f"need a (seeds, windows) array, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    n_s, n_w = x.shape
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # in blocks: (seeds, block, windows) stays small
        b = min(1000, resamples - start)
        per_seed = x[:, rng.integers(0, n_w, (b, n_w))].mean(-1)  # (seeds, b)
        pick = rng.integers(0, n_s, (b, n_s))
        means[start : start + b] = per_seed[pick, np.arange(b)[:, None]].mean(-1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(x.mean()), float(lo), float(hi)


def t_interval(values: list[float]) -> tuple[float, float]:
    """The 95% Student t interval of the mean of per-seed values (n - 1 degrees of freedom); NaNs for n < 2.
    With few seeds the percentile bootstrap is too narrow (its resampled means vary (n - 1) / n as much as
    the mean does, and 5 points make poor tails): reports read the wider of the two."""
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    try:
        from scipy.stats import t
    except ImportError:
        raise ImportError("t intervals need scipy: pip install 'mor-pretrain[plot]'") from None
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    q = float(t.ppf(0.975, n - 1))
    return mean - q * se, mean + q * se


def verdict(lo: float, hi: float, margin: float) -> str:
    """What a 95% interval of a difference allows, with `margin` the largest difference called "the same"."""
    if -margin < lo and hi < margin:
        return f"the same (within +-{margin:g})"
    if hi < 0 or lo > 0:
        side = "lower" if hi < 0 else "higher"
        beyond = hi < -margin or lo > margin
        return f"{side}" + (f" by more than {margin:g}" if beyond else "")
    return "not resolved"


@dataclass
class Comparison:
    a: str
    b: str
    seeds: list[int]  # paired: trained by both arms
    mean: float  # a - b, over the paired seeds and the windows
    lo: float  # percentile bootstrap over seeds and windows
    hi: float
    t_lo: float  # Student t over the per-seed differences (NaN with one seed)
    t_hi: float
    verdict: str  # read from the wider of the two intervals


def compare_arms(runs: list[ArmRun], pairs: list[tuple[str, str]], margin: float) -> list[Comparison]:
    """Paired differences a - b of held-out loss: per seed both arms saw the same data order (and, where
    shapes match, the same initial weights), and every run is scored on the same windows."""
    import numpy as np

    by_arm: dict[str, dict[int, ArmRun]] = {}
    for r in runs:
        by_arm.setdefault(r.arm, {})[r.seed] = r
    out = []
    for a, b in pairs:
        for arm in (a, b):
            if arm not in by_arm:
                raise ValueError(f"no runs of arm {arm}; arms: {sorted(by_arm)}")
        seeds = sorted(set(by_arm[a]) & set(by_arm[b]))
        if not seeds:
            raise ValueError(f"arms {a} and {b} share no seed")
        widths = {len(by_arm[arm][s].windows) for arm in (a, b) for s in seeds}
        if len(widths) != 1:
            raise ValueError(f"{a} and {b}: runs were scored on different numbers of windows {sorted(widths)}")
        diff = np.array([by_arm[a][s].windows for s in seeds]) - np.array([by_arm[b][s].windows for s in seeds])
        mean, lo, hi = bootstrap_mean(diff)
        t_lo, t_hi = t_interval(diff.mean(1).tolist())
        wide = (lo, hi) if math.isnan(t_lo) else (min(lo, t_lo), max(hi, t_hi))
        out.append(Comparison(a, b, seeds, mean, lo, hi, t_lo, t_hi, verdict(*wide, margin)))
    return out


def arm_table(runs: list[ArmRun]) -> str:
    """One row per arm: n, seeds, mean held-out loss with its 95% interval, the spread between seeds (sd of
    the runs' means) and the evaluation noise of one run's mean (sd over windows / sqrt(windows)), the
    trainer's own set, and the gate's mean and spread per recursion step at the end of training."""
    import numpy as np

    lines = [
        "| arm | variant | lr | warmup | tokens | n | seeds | val NLL (64k) mean | 95% CI bootstrap | 95% CI t "
        "| sd between seeds | window s.e. | trainer's set (16k) | gate mean / sd per step | wall min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in dict.fromkeys(r.arm for r in runs):
        rs = sorted((r for r in runs if r.arm == arm), key=lambda r: r.seed)
        x = np.array([r.windows for r in rs])
        mean, lo, hi = bootstrap_mean(x)
        t_lo, t_hi = t_interval(x.mean(1).tolist())
        sd = float(x.mean(1).std(ddof=1)) if len(rs) > 1 else math.nan
        se = float((x.std(1, ddof=1) / math.sqrt(x.shape[1])).mean())
        trainer = [r.trainer_val for r in rs if r.trainer_val is not None]
        steps = sorted({int(k.rsplit("/", 1)[1]) for r in rs for k in r.gates})
        gate = {k: float(np.mean([r.gates[k] for r in rs])) for k in rs[0].gates}
        gates = "; ".join(f"{gate[f'gate_mean/{i}']:.3f} / {gate[f'gate_std/{i}']:.3f}" for i in steps)
        lines.append(
            f"| {arm} | {rs[0].variant} | {rs[0].lr:g} | {rs[0].warmup_steps} | {_si(rs[0].tokens)} | {len(rs)} "
            f"| {', '.join(str(r.seed) for r in rs)} | {mean:.4f} | {lo:.4f} to {hi:.4f} | {t_lo:.4f} to {t_hi:.4f} "
            f"| {sd:.4f} | {se:.4f} "
            f"| {_num(sum(trainer) / len(trainer) if trainer else None)} | {gates or '-'} "
            f"| {np.mean([r.wall_s for r in rs]) / 60:.1f} |"
        )
    return "\n".join(lines)


def comparison_table(comparisons: list[Comparison]) -> str:
    lines = [
        "| a | b | paired seeds | a - b | 95% CI bootstrap (seeds x windows) | 95% CI t (seeds) | verdict (wider CI) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        lines.append(
            f"| {c.a} | {c.b} | {len(c.seeds)} ({', '.join(map(str, c.seeds))}) | {c.mean:+.4f} "
            f"| {c.lo:+.4f} to {c.hi:+.4f} | {c.t_lo:+.4f} to {c.t_hi:+.4f} | {c.verdict} |"
        )
    return "\n".join(lines)


def write_paired_report(
    run_dirs: list[str | Path], pairs: list[tuple[str, str]], margin: float, out_dir: str | Path | None
) -> str:
    """The arms' table and the paired comparisons; with `out_dir`, also paired.md and paired.json (every
    run's per-window losses and gate statistics, so the figures can be recomputed without the runs)."""
    runs = [read_arm_run(d) for d in run_dirs]
    comparisons = compare_arms(runs, pairs, margin)
    text = (
        f'## Arms\n\n{arm_table(runs)}\n\n## Paired differences (margin for "the same": +-{margin:g} nats)\n\n'
        f"{comparison_table(comparisons)}\n"
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "paired.md").write_text(text)
        data = {
            "margin": margin,
            "runs": [dataclasses.asdict(r) for r in runs],
            "comparisons": [dataclasses.asdict(c) for c in comparisons],
        }
        (out / "paired.json").write_text(json.dumps(data, indent=1) + "\n")
    return text

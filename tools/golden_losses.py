"""The golden loss file: the first 20 training losses of the debug configs, bit for bit.

    python tools/golden_losses.py            # train them and compare with tests/golden_losses.json
    python tools/golden_losses.py --write    # regenerate the file, on purpose (a deliberate numerics change)

Each config (vanilla, MoR expert choice, MoR token choice) trains 20 steps as one process on the default
corpus and tokenizer (scripts/setup.sh fetches them), one thread, logging every step; the losses are read
back from TensorBoard as the float32 values it stores. Tolerant tests miss a silent change of numerics
(an op reordered, a dtype moved); this one does not. Floating point depends on the kernels, so the file
records the torch version and the CPU kernels it was made with, and comparisons elsewhere are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden_losses.json"
STEPS = 20
CONFIGS = {
    "vanilla": ("debug_vanilla", []),
    "expert": ("debug_mor", []),
    "token": ("debug_mor", ["--model.router=token", "--model.balancing=loss_free"]),
}


def environment() -> dict[str, str]:
    """What the floats depend on besides the code: torch's version, the CPU kernels it dispatches to, and the
    processor's instruction set (two AVX512 machines with other extensions gave losses 1e-6 apart)."""
    import hashlib

    import torch

    cpu = torch.backends.cpu.get_cpu_capability()
    info = Path("/proc/cpuinfo")  # Linux; elsewhere the flags are unknown and compare as "?"
    lines = info.read_text().splitlines() if info.exists() else []
    flags = next((ln for ln in lines if ln.startswith("flags")), "")
    isa = hashlib.sha1(" ".join(sorted(flags.split(":")[-1].split())).encode()).hexdigest()[:12] if flags else "?"
    return {"torch": torch.__version__, "cpu_capability": cpu, "cpu_flags": isa}


def train_losses(config: str, overrides: list[str], run_root: Path) -> list[float]:
    """train/loss at steps 1..STEPS of `python train.py` (a group of one, one thread)."""
    from mor_pretrain.config import TRAIN_LOSS, RunFolder
    from mor_pretrain.isoflop import read_scalars

    name = f"golden_{config}_{len(overrides)}"
    cmd = [sys.executable, "train.py", "--config", f"train_configs/{config}.toml", f"--name={name}"]
    cmd += [f"--run_root={run_root}", f"--training.steps={STEPS}", "--metrics.log_interval=1"]
    cmd += ["--training.val_interval=0", "--training.device=cpu", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    series = read_scalars(RunFolder(run_root / name).tb)[TRAIN_LOSS]
    return [series[s] for s in range(1, STEPS + 1)]


def measure() -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        return {kind: train_losses(config, overrides, Path(tmp)) for kind, (config, overrides) in CONFIGS.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help=f"regenerate {GOLDEN.relative_to(ROOT)}")
    args = p.parse_args(argv)
    losses = measure()
    if args.write:
        GOLDEN.write_text(json.dumps({**environment(), "steps": STEPS, "losses": losses}, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
        return 0
    golden = json.loads(GOLDEN.read_text())
    differ = [k for k in losses if losses[k] != golden["losses"][k]]
    for kind in differ:
        first = next(i for i, (a, b) in enumerate(zip(losses[kind], golden["losses"][kind], strict=True)) if a != b)
        print(f"{kind}: step {first + 1} differs: {losses[kind][first]!r} vs golden {golden['losses'][kind][first]!r}")
    print("equal bit for bit" if not differ else f"{len(differ)} of {len(losses)} configs differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

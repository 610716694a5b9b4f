"""Train the arms x seeds of an efficacy programme from one recipe, then evaluate every adapter in one report.

    python scripts/programme.py recipes/calm.yaml --arms emotion,random,sft --seeds 1,2,3 --out runs/prog \
        [--eval-args "--sections activations,behaviour,capability"] [-- --max_steps 32 ...]

Arms: ``emotion`` (the recipe's terms), ``random`` (the same terms along seeded random directions) and
``sft`` (every emotion weight 0). Each run is ``scripts/train.py RECIPE --control ARM --seed S`` in its own
process, written to ``<out>/<arm>-s<seed>/``; one seed gives every arm the same data order and LoRA
initialisation (both come from ``seed``). Finished runs (an ``adapter/`` folder) are skipped, so a stopped
programme continues where it stopped. Flags after ``--`` go to every training run.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTROL = {"emotion": "none", "random": "random", "sft": "sft"}


def train_commands(recipe: str, arms: list[str], seeds: list[int], out: Path, extra: list[str]) -> list[list[str]]:
    """One scripts/train.py command per arm and seed, seeds outermost (a partial programme has whole seeds)."""
    return [
        [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            recipe,
            "--control",
            CONTROL[arm],
            "--seed",
            str(seed),
            "--output_dir",
            str(out / f"{arm}-s{seed}"),
            "--run_name",
            f"{out.name}-{arm}-s{seed}",
            *extra,
        ]
        for seed in seeds
        for arm in arms
    ]


def eval_command(model: str, runs: list[Path], out: Path, eval_args: list[str]) -> list[str]:
    """``emotune eval`` over every adapter (``--adapter name=path``), with the sft arm as the control."""
    command = [sys.executable, "-m", "emotune.cli", "eval", "--model", model, "--out", str(out / "eval")]
    for run in runs:
        command += ["--adapter", f"{run.name}={run / 'adapter'}"]
    controls = [run.name for run in runs if run.name.startswith("sft-")]
    for name in controls:
        command += ["--control", name]
    return command + eval_args


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    extra = args[args.index("--") + 1 :] if "--" in args else []
    args = args[: args.index("--")] if "--" in args else args
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--arms", default="emotion,random,sft", help="comma-separated: emotion, random, sft")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated integers")
    parser.add_argument("--out", required=True, help="programme folder: <out>/<arm>-s<seed>/ and <out>/eval/")
    parser.add_argument("--eval-args", default="", help="extra flags for `emotune eval`, one quoted string")
    parser.add_argument("--no-eval", action="store_true", help="train only")
    opts = parser.parse_args(args)
    arms = [a.strip() for a in opts.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in CONTROL]
    if bad:
        parser.error(f"--arms: unknown arm(s) {', '.join(bad)}; use some of {', '.join(CONTROL)}")
    try:
        seeds = [int(s) for s in opts.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: {opts.seeds!r} is not a comma-separated list of integers, e.g. 1,2,3")
    out = Path(opts.out)
    runs = []
    for command in train_commands(opts.recipe, arms, seeds, out, extra):
        run = Path(command[command.index("--output_dir") + 1])
        runs.append(run)
        if (run / "adapter" / "adapter_config.json").exists():
            print(f"{run}: done already, skipped")
            continue
        print("+", shlex.join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            print(f"programme: training {run.name} failed (see above); later runs not started", file=sys.stderr)
            return 2
    if opts.no_eval:
        return 0
    from emotune.train import parse_recipe

    _, _, model_args = parse_recipe([opts.recipe, *extra])
    command = eval_command(model_args.model_name_or_path, runs, out, shlex.split(opts.eval_args))
    print("+", shlex.join(command), flush=True)
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())

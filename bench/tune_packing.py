"""N trials of the tiny job one after another vs N at once with fractional resources, through `tune.search`.

    .venv/bin/python bench/tune_packing.py [--trials 4] [--steps 6] [--cpus 2]

Both modes run the same grid of N learning rates (no early stopping, so every trial does all its steps) on one
private local Ray cluster of --cpus CPUs, one Ray Train worker per trial. "sequential": one trial at a time holding
every CPU; "packed": all N at once, each holding cpus/N. Prints a table and the sequential/packed wall-time ratio.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "quickstart-tune.yaml"


def run_mode(name: str, trials: int, steps: int, cpus: int, out: Path) -> dict:
    from ray_sft import spec, tune

    at_once = 1 if name == "sequential" else trials
    rates = ", ".join(f"{1e-3 * (i + 1):.1e}" for i in range(trials))
    job = spec.load(JOB, [
        f"output.dir={out}", f"output.name={name}", f"training.max_steps={steps}", "training.eval_steps=2",
        "training.save_steps=2", "training.logging_steps=2", "data.max_rows=96", "data.eval_rows=16",
        "training.gradient_accumulation_steps=2", "tune.num_samples=1", "tune.scheduler.type=none",
        f"tune.search_space={{training.learning_rate: {{grid: [{rates}]}}}}",
        f"tune.max_concurrent_trials={at_once}", f"tune.cpus_per_trial={cpus / at_once}"])
    started = time.monotonic()
    outcome = tune.search(job)
    wall = time.monotonic() - started
    done = sum(r["status"] == "TERMINATED" and r["steps"] == steps for r in outcome.rows)
    return {"mode": name, "trials": trials, "at_once": at_once, "cpu_per_trial": cpus / at_once,
            "trials_completed": done, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    from ray_sft import cluster

    out = Path(tempfile.mkdtemp(prefix="tune-packing-"))
    try:
        with cluster.connect(num_cpus=args.cpus):
            rows = [run_mode(mode, args.trials, args.steps, args.cpus, out) for mode in ("sequential", "packed")]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print("\n| mode | trials | at once | CPU per trial | trials completed | wall (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['trials']} | {r['at_once']} | {r['cpu_per_trial']:g} | "
              f"{r['trials_completed']}/{r['trials']} | {r['wall_s']:.1f} |")
    print(f"\nsequential / packed wall time: {rows[0]['wall_s'] / rows[1]['wall_s']:.2f}x")


if __name__ == "__main__":
    main()

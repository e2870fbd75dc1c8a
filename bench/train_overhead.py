"""What Ray Train adds: the tiny job through `ray-sft train` (1 worker) vs the same training in a plain process.

Both runs use the same spec, data, steps and the same SFTTrainer (train.build_trainer); each runs in its own
subprocess so imports count as start-up in both. Per-step time is the median gap between consecutive optimizer
steps after a warm-up, from the step timestamps each run records; start-up is the time from process start to
the first step's end minus one step. Usage:

    .venv/bin/python bench/train_overhead.py [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "jobs" / "quickstart.yaml"
WARMUP = 5


def overrides(out: Path, steps: int) -> list[str]:
    # No eval and one save at the end: the steps measured are training steps in both runs.
    return [f"output.dir={out}", "output.name=bench", f"training.max_steps={steps}", "training.logging_steps=1",
            "data.eval_rows=0", f"training.save_steps={steps}", f"training.eval_steps={steps}",
            "scaling.num_workers=1"]


def plain_run(out: Path, steps: int) -> None:
    """The baseline, run in a subprocess: one process, no Ray, the same trainer."""
    import torch
    from transformers import TrainerCallback

    from ray_sft import data, modeling, spec, train

    torch.set_num_threads(1)  # what Ray gives a 1-CPU worker
    job = spec.load(SPEC, overrides(out, steps))
    path = modeling.resolve_model_path(job)
    tokenizer = modeling.load_tokenizer(path, job.model)
    examples = data.load_examples(job, tokenizer)
    times = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append({"step": state.global_step, "time": time.time()})

    trainer = train.build_trainer(job, path, tokenizer, examples.train, [], "cpu", str(out / "plain"),
                                  callbacks=[StepTimes()])
    trainer.train()
    (out / "plain_steps.json").write_text(json.dumps(times))


def measure(started: float, points: list[dict]) -> dict:
    times = [p["time"] for p in sorted(points, key=lambda p: p["step"])]
    gaps = [b - a for a, b in zip(times[WARMUP:], times[WARMUP + 1:-1])]
    per_step = statistics.median(gaps)
    return {"startup_s": times[0] - started - per_step, "per_step_s": per_step, "steps": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--plain-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_into:
        plain_run(args.plain_into, args.steps)
        return
    out = Path(tempfile.mkdtemp(prefix="bench-train-"))
    started = time.time()
    subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--plain-into", str(out)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    plain = measure(started, json.loads((out / "plain_steps.json").read_text()))

    started = time.time()
    subprocess.run([str(Path(sys.executable).parent / "ray-sft"), "train", str(SPEC), *overrides(out, args.steps)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ray_points = [json.loads(line) for line in (out / "bench" / "metrics.jsonl").read_text().splitlines()]
    ray = measure(started, [p for p in ray_points if "loss" in p])

    print(f"\ntiny quickstart job, {args.steps} optimizer steps, 1 worker, CPU ({out})")
    print(f"{'run':<22}{'start-up s':>12}{'per step s':>12}{'steps':>7}")
    for name, row in (("plain process", plain), ("ray-sft train", ray)):
        print(f"{name:<22}{row['startup_s']:>12.1f}{row['per_step_s']:>12.3f}{row['steps']:>7}")
    print(f"per-step ratio ray/plain: {ray['per_step_s'] / plain['per_step_s']:.3f} "
          f"(Ray adds {100 * (ray['per_step_s'] / plain['per_step_s'] - 1):+.1f}% per step)")


if __name__ == "__main__":
    main()

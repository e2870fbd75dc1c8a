"""An 8-trial `ray-sft tune` search packed onto one GPU (fractional GPUs, fast settings) vs the recipe's one trial.

    python bench/gpu/tune_speed.py --out $OUT --baseline $OUT/train_speed_recipe_ray_fast.json
    python bench/gpu/tune_speed.py --out $OUT --gpus 4        # the same 8 trials spread over 4 GPUs (0.5 GPU each)
    python bench/gpu/tune_speed.py --out $OUT --gpus 2 --no-baseline   # the search alone, to compare GPU counts

Same model shape and synthetic data as train_speed.py (its setup is reused, and its work folder when the two run in
one command). The baseline is run (a) of train_speed.py, the recipe in plain TRL, measured in the same command; without
--baseline this script measures it itself first. The search runs as a user runs it (`ray-sft tune`, fast spec, no
early stopping, so every trial trains every step) and is read back from its run folder:

- aggregate trained tokens/s while all trials train at once: from the window that starts when the last trial has
  finished its first (warm-up) step and ends when the first trial reaches its second-to-last step (the last one
  also evaluates and saves), the trained tokens of
  every trial in that window (each trial's metrics.jsonl, interpolated between reports) over its length;
- end to end: every trial's trained tokens over the wall time of the whole `ray-sft tune` command (start-up, model
  loads, evaluation and checkpoints included);
- each trial's peak GPU memory, its result and the exported best adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed  # noqa: E402  (one folder of scripts, not a package)

SEARCH = ("{lora.r: {choice: [8, 16]}, lora.alpha: {choice: [16, 32]}, lora.dropout: {uniform: [0.0, 0.1]}, "
          "training.learning_rate: {loguniform: [1.0e-4, 5.0e-4]}}")


def tune_command(work: Path, trials: int, steps: int, device: str, gpus: int) -> list[str]:
    share = gpus / trials
    overrides = train_speed.overrides(work, steps, "tune8", device) + [
        "data.eval_rows=64", f"tune.search_space={SEARCH}", f"tune.num_samples={trials}",
        "tune.scheduler.type=none", f"tune.max_concurrent_trials={trials}"] + (
        [f"tune.gpus_per_trial={share}", "tune.cpus_per_trial=1.5"] if device == "cuda"
        else ["model.attn_implementation=sdpa", "tune.cpus_per_trial=1"])  # varlen is CUDA-only
    return [sys.executable, "-m", "ray_sft.cli", "tune", str(train_speed.FAST_SPEC), *overrides]


def interpolate(points: list[tuple[float, float]], t: float) -> float:
    """Trained tokens at time t, linear between a trial's reports (points sorted by time)."""
    for (t0, n0), (t1, n1) in zip(points, points[1:]):
        if t0 <= t <= t1:
            return n0 + (n1 - n0) * (t - t0) / max(t1 - t0, 1e-9)
    return points[0][1] if t < points[0][0] else points[-1][1]


def summarise(run_dir: Path, wall_s: float, rc: int) -> dict:
    trials = {}
    for metrics in sorted((run_dir / "trials").glob("*/metrics.jsonl")):
        records = [json.loads(line) for line in open(metrics)]
        steps = [r for r in records if "loss" in r and "num_tokens" in r]
        trials[metrics.parent.name] = {
            "points": [(r["time"], r["num_tokens"]) for r in steps], "steps": len(steps),
            # The last step's report comes after its evaluation and checkpoint: the window ends a step before.
            "first_step_time": steps[0]["time"] if steps else None,
            "last_step_time": steps[-2]["time"] if len(steps) >= 3 else None,
            "tokens": steps[-1]["num_tokens"] if steps else 0,
            "peak_gib": max((r.get("gpu_peak_gib", 0) for r in records), default=None)}
    result = {"rc": rc, "wall_s": wall_s, "trials": len(trials),
              "peak_gib_per_trial": sorted(round(t["peak_gib"] or 0, 2) for t in trials.values()),
              "end_to_end_tokens_per_s": sum(t["tokens"] for t in trials.values()) / wall_s}
    timed = [t for t in trials.values() if t["steps"] >= 3]
    if timed and len(timed) == len(trials):
        start = max(t["first_step_time"] for t in timed)
        end = min(t["last_step_time"] for t in timed)
        if end > start:
            tokens = sum(interpolate(t["points"], end) - interpolate(t["points"], start) for t in timed)
            result.update(window_s=end - start, aggregate_tokens_per_s=tokens / (end - start))
    rows_file = run_dir / "trials.json"
    if rows_file.is_file():
        rows = json.loads(rows_file.read_text())
        result["statuses"] = [r["status"] for r in rows]
        result["best"] = json.loads((run_dir / "best.json").read_text()) if (run_dir / "best.json").is_file() else None
        result["best_adapter_exported"] = (run_dir / "best" / "adapter" / "adapter_config.json").is_file()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/train_speed"))
    parser.add_argument("--baseline", type=Path, help="train_speed.py's JSON from the same command (run (a))")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--gpus", type=int, default=1, help="GPUs the trials spread over (fractional GPUs each)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="the search only, no recipe run (to compare GPU counts, one search each)")
    parser.add_argument("--deadline", type=float, default=560)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: dry-run the script")
    args = parser.parse_args()
    deadline = time.monotonic() + args.deadline
    train_speed.prepare(args)

    if args.no_baseline:
        baseline = {}
    elif args.baseline and args.baseline.is_file():
        baseline = json.loads(args.baseline.read_text())["runs"]["(a) recipe, plain TRL"]
    else:
        baseline = train_speed.summarise(train_speed.plain_run(args.work, "recipe", train_speed.TIMED_LAST + 1,
                                                               args.device, deadline, "a"))
    started = time.monotonic()
    rc = train_speed.run_logged(tune_command(args.work, args.trials, args.steps, args.device, args.gpus),
                                args.work / "tune8.log", deadline)
    tuned = summarise(args.work / "runs" / "tune8", time.monotonic() - started, rc)
    base = baseline.get("tokens_per_s")
    if base and tuned.get("aggregate_tokens_per_s"):
        tuned["tune8_aggregate_over_recipe"] = tuned["aggregate_tokens_per_s"] / base
        tuned["tune8_end_to_end_over_recipe"] = tuned["end_to_end_tokens_per_s"] / base
    report = {"environment": train_speed.environment(), "gpus": args.gpus, "baseline_recipe": baseline, "tune": tuned}
    (args.out / "tune_speed.json").write_text(json.dumps(report, indent=1))
    with open(args.out / "tune_speed_log.txt", "w") as out:
        out.write((args.work / "tune8.log").read_text()[-20000:])
    print(json.dumps(report["environment"]))
    print("| run | trained tokens/s | wall s | peak GiB per trial | vs recipe |\n|---|---|---|---|---|")
    if base:
        print(f"| recipe, one trial, plain TRL | {base:,.0f} | - | {baseline.get('peak_gib') or 0:.1f} | 1.00x |")
    for label, key in (("aggregate, all trials training", "aggregate_tokens_per_s"),
                       ("end to end (start-up, eval, checkpoints included)", "end_to_end_tokens_per_s")):
        value = tuned.get(key)
        ratio = f"{value / base:.1f}x" if value and base else "-"
        print(f"| {args.trials} trials on {args.gpus} GPU(s), {label} | {value or 0:,.0f} | {tuned['wall_s']:.0f} | "
              f"{max(tuned['peak_gib_per_trial'] or [0]):.1f} | {ratio} |")
    print({k: tuned.get(k) for k in ("rc", "statuses", "best_adapter_exported", "window_s", "peak_gib_per_trial")})


if __name__ == "__main__":
    main()

"""Data-parallel scaling of `ray-sft train` (fast spec) over the GPUs of one host, 3 interleaved runs per setting.

    python bench/gpu/scaling.py --out $OUT --workers 1,2 --repeats 3            # on nvidia-h200-x2
    python bench/gpu/scaling.py --out $OUT --workers 1,2,4 --repeats 3          # on nvidia-h200-x4
    python bench/gpu/scaling.py --out /tmp/o --workers 1,2 --repeats 1 --warmup 1 --timed 2 --tiny --device cpu

Same model shape and synthetic data as train_speed.py (its setup and run helpers are reused). Two settings per N > 1:
- `dpN`, the recipe's global batch: N workers each take 64/N rows per optimizer step from their own shard (gradient
  accumulation 16/N of 4-row batches, executed as one padding-free pass), and DDP averages the gradients;
- `dpN-weak`, 64 rows per worker: each worker runs the fast spec's own step, so a step trains 64 x N rows.
Every setting runs --repeats times, interleaved (dp1 dp2 dp2-weak dp1 ...), each timing --timed optimizer steps after
--warmup. Reported per setting: trained tokens/s of all workers together (TRL counts every process's tokens), the
GPU-busy fraction averaged over its GPUs, peak GPU memory of rank 0, and the scaling efficiency, tokens/s at N over
N x tokens/s at 1, taken within each repeat (the median and min-max over repeats). The rows of a step differ with N
(each worker samples its own shard), so the losses agree statistically, not step for step. NVLink multicast stays
off (NCCL_NVLS_ENABLE=0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed  # noqa: E402  (one folder of scripts, not a package)

RECIPE_ROWS_PER_STEP, RECIPE_BATCH = 64, 4


def settings(workers: list[int]) -> dict[str, tuple[int, int]]:
    """name -> (workers, rows per worker per optimizer step)."""
    found = {}
    for n in workers:
        found[f"dp{n}"] = (n, RECIPE_ROWS_PER_STEP // n)
        if n > 1:
            found[f"dp{n}-weak"] = (n, RECIPE_ROWS_PER_STEP)
    return found


def worker_overrides(workers: int, rows_per_worker: int, device: str) -> list[str]:
    return [f"scaling.num_workers={workers}",
            f"training.gradient_accumulation_steps={rows_per_worker // RECIPE_BATCH}",
            f"training.micro_batch_size={rows_per_worker}"] + (
        ["scaling.gpus_per_worker=1"] if device == "cuda" else ["model.attn_implementation=sdpa"])


def one_run(args, name: str, workers: int, rows_per_worker: int, label: str, deadline: float,
            busy: train_speed.GpuBusy) -> dict:
    steps = args.warmup + args.timed + 1  # a Ray run's last step saves: untimed
    extra = worker_overrides(workers, rows_per_worker, args.device) + args.extra
    started = time.time()
    outcome = train_speed.ray_run(args.work, train_speed.FAST_SPEC, label, steps, args.device, deadline, extra)
    result = train_speed.summarise({**outcome, "started": started}, args.warmup, args.warmup + args.timed, busy)
    if result["tokens_per_s"]:
        at = {s["step"]: s["time"] for s in outcome["steps"]}
        per_gpu = [busy.between(at[args.warmup], at[args.warmup + args.timed], gpu) for gpu in range(workers)]
        result["gpu_busy"] = statistics.mean(per_gpu) if None not in per_gpu else None
    return result


def efficiencies(runs: dict[str, list[dict]], found: dict[str, tuple[int, int]]) -> dict[str, list[float]]:
    """Per repeat, tokens/s of each setting over N x the same repeat's 1-worker tokens/s."""
    out = {}
    for name, (n, _) in found.items():
        pairs = zip(runs[name], runs.get("dp1", []))
        out[name] = [r["tokens_per_s"] / (n * one["tokens_per_s"]) for r, one in pairs
                     if r["tokens_per_s"] and one["tokens_per_s"]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/train_speed"))
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--timed", type=int, default=10, help="optimizer steps timed after the warm-up")
    parser.add_argument("--extra", action="append", default=[], help="a spec override for every run, e.g. "
                        "training.compile=true")
    parser.add_argument("--deadline", type=float, default=560)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: dry-run the script")
    args = parser.parse_args()
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # inherited by the Ray cluster `ray-sft train` starts
    deadline = time.monotonic() + args.deadline
    started = time.monotonic()
    train_speed.prepare(args)
    found = settings([int(w) for w in args.workers.split(",")])
    if "dp1" not in found:
        parser.error("--workers must include 1: the efficiency is taken against one worker")

    runs: dict[str, list[dict]] = {name: [] for name in found}
    with train_speed.GpuBusy() as busy:
        for index in range(args.repeats):  # interleaved: dp1 dp2 dp2-weak dp1 ...
            for name, (n, rows) in found.items():
                r = one_run(args, name, n, rows, f"{name}-{index}", deadline, busy)
                runs[name].append(r)
                print(f"{name} #{index}: " + (f"{r['tokens_per_s']:,.0f} tokens/s, {r['s_per_step']:.3f} s/step, "
                                              f"GPU busy {r['gpu_busy'] or 0:.0%}"
                                              if r["tokens_per_s"] else f"failed (rc {r['rc']})"), flush=True)
    ratios = efficiencies(runs, found)
    summary = {name: {key: train_speed.spread([r.get(key) for r in runs[name]])
                      for key in ("tokens_per_s", "s_per_step", "tokens_per_step", "gpu_busy")}
               | {"workers": found[name][0], "rows_per_step": found[name][0] * found[name][1],
                  "peak_gib": max((r.get("peak_gib") or 0 for r in runs[name]), default=None),
                  "scaling_efficiency": train_speed.spread(ratios[name])}
               for name in found}
    report = {"environment": train_speed.environment(), "warmup_steps": args.warmup, "timed_steps": args.timed,
              "repeats": args.repeats, "extra": args.extra, "summary": summary, "runs": runs,
              "wall_s": time.monotonic() - started}
    (args.out / "scaling.json").write_text(json.dumps(report, indent=1))
    with open(args.out / "scaling_logs.txt", "w") as out:
        for log in sorted(args.work.glob("dp*.log")):
            out.write(f"===== {log.name}\n{log.read_text()[-4000:]}\n")
    print(json.dumps(report["environment"]))
    print("| setting | rows per step | trained tokens/s, median (min-max) | s/step | GPU busy | peak GiB (rank 0) | "
          "scaling efficiency, median (min-max) |\n|---|---:|---|---:|---:|---:|---|")
    for name, s in summary.items():
        tps, eff = s["tokens_per_s"], s["scaling_efficiency"]
        if not tps:
            print(f"| {name} | {s['rows_per_step']} | failed | - | - | - | - |")
            continue
        busy_text = f"{s['gpu_busy']['median']:.0%}" if s["gpu_busy"] else "-"
        print(f"| {name} | {s['rows_per_step']} | {tps['median']:,.0f} ({tps['min']:,.0f}-{tps['max']:,.0f}) | "
              f"{s['s_per_step']['median']:.3f} | {busy_text} | {s['peak_gib'] or 0:.1f} | "
              f"{eff['median']:.2f} ({eff['min']:.2f}-{eff['max']:.2f}) |")


if __name__ == "__main__":
    main()

"""Data-parallel scaling of `ray-sft train` (fast spec) over 1, 2 and 4 GPUs of one host, at equal global batch.

    python bench/gpu/scaling.py --out $OUT --workers 1,2,4                  # on nvidia-h200-x4
    python bench/gpu/scaling.py --out /tmp/o --workers 1,2 --tiny --device cpu   # CPU dry run (gloo)

Same model shape and synthetic data as train_speed.py (its setup and run helpers are reused). Every run keeps the
recipe's 64 rows per optimizer step: N workers each take 64/N rows per step from their own shard (gradient
accumulation 16/N of 4-row batches, executed as one padding-free pass), and DDP averages the gradients. Reported
per N: trained tokens/s of all workers together (TRL counts every process's tokens), scaling efficiency
(tokens/s at N / (N x tokens/s at 1)), peak GPU memory of rank 0, and how far the loss of the first steps is from
the 1-worker run's. The rows of a step differ with N (each worker samples its own shard), so the losses agree
statistically, not step for step. NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed  # noqa: E402  (one folder of scripts, not a package)

RECIPE_ROWS_PER_STEP, RECIPE_BATCH = 64, 4


def worker_overrides(workers: int, device: str) -> list[str]:
    per_worker = RECIPE_ROWS_PER_STEP // workers
    return [f"scaling.num_workers={workers}", f"training.gradient_accumulation_steps={per_worker // RECIPE_BATCH}",
            f"training.micro_batch_size={per_worker}"] + (
        ["scaling.gpus_per_worker=1"] if device == "cuda" else ["model.attn_implementation=sdpa"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/train_speed"))
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--deadline", type=float, default=560)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: dry-run the script")
    args = parser.parse_args()
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # inherited by the Ray cluster `ray-sft train` starts
    deadline = time.monotonic() + args.deadline
    train_speed.prepare(args)

    rows = {}
    for n in (int(w) for w in args.workers.split(",")):
        outcome = train_speed.ray_run(args.work, train_speed.FAST_SPEC, f"dp{n}", args.steps, args.device, deadline,
                                      worker_overrides(n, args.device))
        rows[n] = train_speed.summarise(outcome)
    one = rows.get(1, {})
    for n, r in rows.items():
        if r.get("tokens_per_s") and one.get("tokens_per_s"):
            r["scaling_efficiency"] = r["tokens_per_s"] / (n * one["tokens_per_s"])
        if r.get("losses") and one.get("losses"):
            r["max_abs_loss_diff_vs_1"] = max(abs(a - b) for a, b in zip(r["losses"], one["losses"]))
    report = {"environment": train_speed.environment(), "runs": {str(n): r for n, r in rows.items()}}
    for n in (2, 4):
        if "scaling_efficiency" in rows.get(n, {}):
            report[f"scaling_efficiency_{n}"] = rows[n]["scaling_efficiency"]
    (args.out / "scaling.json").write_text(json.dumps(report, indent=1))
    with open(args.out / "scaling_logs.txt", "w") as out:
        for n in rows:
            log = args.work / f"dp{n}.log"
            out.write(f"===== {log.name}\n{log.read_text()[-4000:] if log.is_file() else ''}\n")
    print(json.dumps(report["environment"]))
    print("| workers | trained tokens/s | s/step | peak GiB (rank 0) | scaling efficiency | max loss diff vs 1 |")
    print("|---|---|---|---|---|---|")
    for n, r in rows.items():
        if not r.get("tokens_per_s"):
            print(f"| {n} | failed (rc {r['rc']}) | - | - | - | - |")
            continue
        print(f"| {n} | {r['tokens_per_s']:,.0f} | {r['s_per_step']:.2f} | {r['peak_gib'] or 0:.1f} | "
              f"{r.get('scaling_efficiency', 0):.2f} | {r.get('max_abs_loss_diff_vs_1', 0):.4f} |")


if __name__ == "__main__":
    main()

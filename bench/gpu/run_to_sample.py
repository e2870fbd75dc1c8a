"""`ray-sft run` on the fast GPU spec: seconds from the end of training to the printed sample completion.

What a user waits for after the last optimizer step: the adapter's export, the Serve app's start, the replica's
model load, merge and decode warm-up (CUDA graph capture), and the sample request over HTTP. Each repeat is a
fresh `ray-sft run` exactly as a user types it (its own Ray cluster), on train_speed's synthetic model and rows:

    python bench/gpu/run_to_sample.py --out $OUT --repeats 3
    python bench/gpu/run_to_sample.py --out /tmp/o --tiny --device cpu --repeats 1   # CPU dry run

The end of training is the worker's wall clock at the last step's loss (metrics.jsonl "timestamp"); the sample's
arrival is when the "sample completion:" line reaches this script's pipe.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import FAST_SPEC, REPO, environment, overrides, prepare  # noqa: E402

MARKS = {"adapter": "adapter:", "serving": "serving ", "sample": "sample completion:"}


def one_run(work: Path, name: str, steps: int, device: str, timeout_s: float) -> dict:
    cpu = ["model.attn_implementation=sdpa"] if device == "cpu" else []
    command = [sys.executable, "-m", "ray_sft.cli", "run", str(FAST_SPEC), *overrides(work, steps, name, device),
               *cpu]
    seen: dict[str, float] = {}
    started = time.time()
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        for line in proc.stdout:
            log.write(f"[{time.time() - started:7.1f}s] {line}")
            for mark, text in MARKS.items():
                if text in line and mark not in seen:
                    seen[mark] = time.time()
            if time.time() - started > timeout_s:
                proc.kill()
                break
        rc = proc.wait()
    metrics_path = work / "runs" / name / "metrics.jsonl"
    steps_ = [json.loads(line) for line in open(metrics_path)] if metrics_path.is_file() else []
    trained = max((m["timestamp"] for m in steps_ if "loss" in m), default=None)
    if rc != 0 or trained is None or "sample" not in seen:
        return {"rc": rc, "train_end_to_sample_s": None}
    return {"rc": rc, "train_end_to_sample_s": seen["sample"] - trained,
            "to_adapter_s": seen.get("adapter", trained) - trained,
            "to_serving_s": seen.get("serving", trained) - trained, "wall_s": time.time() - started}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/train_speed"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps each run trains")
    parser.add_argument("--deadline", type=float, default=560, help="seconds for the whole script")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: dry-run the script")
    args = parser.parse_args()
    deadline = time.monotonic() + args.deadline
    prepare(args)
    runs = []
    for index in range(args.repeats):
        left = deadline - time.monotonic()
        if left < 60:
            print(f"run {index}: skipped, {left:.0f}s left before the deadline", flush=True)
            break
        runs.append(one_run(args.work, f"run-{index}", args.steps, args.device, left))
        print(f"run {index}: {runs[-1]}", flush=True)
    seconds = [r["train_end_to_sample_s"] for r in runs if r["train_end_to_sample_s"] is not None]
    summary = {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds),
               "n": len(seconds)} if seconds else None
    report = {"environment": environment(), "runs": runs, "run_train_end_to_sample_s": summary}
    (args.out / "run_to_sample.json").write_text(json.dumps(report, indent=1))
    with open(args.out / "run_to_sample_logs.txt", "w") as out:
        for log in sorted(args.work.glob("run-*.log")):
            out.write(f"===== {log.name}\n{log.read_text()[-6000:]}\n")
    print(json.dumps(report["environment"]))
    print("| measure | median | min-max | runs |\n|---|---:|---:|---:|")
    if summary:
        print(f"| end of training to printed sample, s | {summary['median']:.1f} | {summary['min']:.1f}-"
              f"{summary['max']:.1f} | {summary['n']} |")


if __name__ == "__main__":
    main()

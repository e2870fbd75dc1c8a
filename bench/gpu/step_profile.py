"""Where a training step's time goes: the GPU's idle gaps inside a few optimizer steps, each charged to what the host
was running meanwhile, and where the first step's compile goes. A diagnostic, not a speed figure (the profiler
slows the host side it watches):

    python bench/gpu/step_profile.py --out $OUT --configs plain-fast-compiled,plain-fast-compiled,plain-fast

(`--tiny --device cpu`: a dry run of the script on CPU.)

Each configuration (train_speed.py's names, plain-process ones only) runs in its own process on train_speed.py's
synthetic model and rows. torch.profiler records --steps optimizer steps after --warmup steps (CPU ops, CUDA
kernels and Python frames); py-spy samples the process and its compile workers from its start to the end of its
first optimizer step. The same configuration listed twice shows the compile with the caches the first run left.
Per run it reports: the GPU's busy fraction inside the profiled steps (the union of kernel, copy and memset time),
the idle time charged to the innermost Python frames and CPU op that were open on the busiest host thread during
each gap, the host-device synchronisations and where they come from, and the compile's hottest frames.
"""

from __future__ import annotations

import argparse
import gzip
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import train_speed

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
# A tensor read on the host (item() runs _local_scalar_dense) or a nonzero() waits for the GPU to drain.
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense",
              "aten::nonzero"}
IDLE_FRAMES = {"acquire", "wait", "sleep", "select", "poll"}
# Frames that only dispatch to the frame below them: skipped when naming where the host was.
WRAPPERS = ("_call_impl", "_wrapped_call_impl", "decorate_context", "inner", "wrapper", "__call__", "forward_call")


def profiler_callback(warmup: int, steps: int, trace: Path, marker: Path):
    """A TrainerCallback: marks the end of the first step (the compile) and records steps warmup+1..warmup+steps."""
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        profiler = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup and steps:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities, with_stack=True)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                marker.write_text(str(time.time()))
            if self.profiler and state.global_step == warmup + steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.profiler.__exit__(None, None, None)
                self.profiler.export_chrome_trace(str(trace))
                self.profiler = None

    return Profile()


# ---------------------------------------------------------------------------------------------------------------
# The trace


def load_trace(path: Path) -> list[dict]:
    return [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X" and "dur" in e]


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def frame_name(event: dict) -> str:
    """"path/to/module.py(123): function" -> "module.py:function" (the line number varies between versions)."""
    name = event["name"]
    if event.get("cat") != "python_function":
        return name
    if name.startswith("<built-in"):  # "<built-in method mm of type object at 0x7f...>: " -> "mm"
        return name.split()[2]
    where, _, function = name.partition(": ")
    return f"{Path(where.split('(')[0]).name}:{function}"


def open_stacks(events: list[dict], times: list[float]) -> list[list[dict]]:
    """For each time, the events of one host thread open at that time, outermost first (the thread's Python frames
    and CPU ops nest, so one sweep over both sorted lists finds them all)."""
    events = sorted(events, key=lambda e: (e["ts"], -e["dur"]))
    order = sorted(range(len(times)), key=times.__getitem__)
    stacks: list[list[dict]] = [[] for _ in times]
    stack: list[dict] = []
    next_event = 0
    for index in order:
        t = times[index]
        while next_event < len(events) and events[next_event]["ts"] <= t:
            event = events[next_event]
            stack = [e for e in stack if e["ts"] + e["dur"] > event["ts"]] + [event]
            next_event += 1
        stack = [e for e in stack if e["ts"] + e["dur"] > t]
        stacks[index] = list(stack)
    return stacks


def where(open_events: list[dict], depth: int = 4) -> str:
    frames = [frame_name(e) for e in open_events if e.get("cat") == "python_function"]
    frames = [f for f in frames if f.split(":")[-1] not in WRAPPERS]
    ops = [e["name"] for e in open_events if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver")]
    return " > ".join(frames[-depth:]) + (f" | {ops[-1]}" if ops else "")


def analyse(trace: Path, steps: int, min_gap_us: float = 20.0) -> dict:
    events = load_trace(trace)
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    host = [e for e in events if e.get("cat") in ("python_function", "cpu_op", "cuda_runtime", "cuda_driver",
                                                   "user_annotation")]
    window = (min(e["ts"] for e in host), max(e["ts"] + e["dur"] for e in host))
    if not gpu:  # a CPU dry run: nothing to charge idle time to
        return {"steps": steps, "wall_ms_per_step": (window[1] - window[0]) / steps / 1e3}
    busy = merged([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    busy_us = sum(b - a for a, b in busy)
    wall_us = window[1] - window[0]
    gaps = [(a[1], b[0]) for a, b in zip(busy, busy[1:]) if b[0] - a[1] >= min_gap_us]
    gaps = [(window[0], busy[0][0])] + gaps + [(busy[-1][1], window[1])]
    threads: dict = {}
    for e in host:
        threads.setdefault(e["tid"], []).append(e)
    middles = [(a + b) / 2 for a, b in gaps]
    by_thread = [open_stacks(events_, middles) for events_ in threads.values()]
    charged: Counter = Counter()
    for index, (start, end) in enumerate(gaps):
        # The thread that was doing something: one inside a CPU op if any, else the one whose innermost open event
        # started last, leaving out threads that wait on a lock (a monitor thread, the main thread in backward).
        stacks = [s[index] for s in by_thread if s[index] and frame_name(s[index][-1]) not in IDLE_FRAMES]
        working = [s for s in stacks if any(e.get("cat") != "python_function" for e in s)] or stacks
        stack = max(working, key=lambda s: s[-1]["ts"]) if working else []
        charged[where(stack)] += end - start
    small_gaps_us = sum(b[0] - a[1] for a, b in zip(busy, busy[1:]) if b[0] - a[1] < min_gap_us)
    syncs: Counter = Counter()
    for events_ in threads.values():
        calls = [e for e in events_ if e["name"] in SYNC_CALLS]
        for call, stack in zip(calls, open_stacks(events_, [e["ts"] + e["dur"] / 2 for e in calls])):
            syncs[f"{call['name']} @ {where([e for e in stack if e is not call], 5)}"] += 1
    kernels: Counter = Counter()
    for e in gpu:
        kernels[e["name"][:90]] += e["dur"]
    return {
        "steps": steps, "wall_ms_per_step": wall_us / steps / 1e3, "gpu_busy": busy_us / wall_us,
        "gpu_events_per_step": len(gpu) / steps, "idle_ms_per_step": (wall_us - busy_us) / steps / 1e3,
        "idle_in_gaps_under_min_ms_per_step": small_gaps_us / steps / 1e3,
        "idle_charged_ms_per_step": [(k, round(v / steps / 1e3, 2)) for k, v in charged.most_common(40)],
        "syncs_per_step": [(k, v / steps) for k, v in syncs.most_common(25)],
        "gpu_ms_per_step_by_kernel": [(k, round(v / steps / 1e3, 2)) for k, v in kernels.most_common(25)],
    }


# ---------------------------------------------------------------------------------------------------------------
# py-spy over the first step


def spy_summary(raw: Path, main_pid: int, top: int = 40) -> dict:
    """From py-spy's raw output (idle samples included): each process's samples (threads and compile workers run in
    parallel: theirs are not wall time), and the main thread's frames by inclusive share of its wall time (a frame
    counted once per stack, "function (file" without the line)."""
    per_process: Counter = Counter()
    inclusive: Counter = Counter()
    main, main_samples = f"process {main_pid}:", 0
    if not raw.is_file():
        return {"samples": 0}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        root = stack.split(":", 1)[0]  # "process 1234"; a command line may itself hold ';', py-spy's separator
        per_process[root] += int(count)
        frames = stack[len(main):].split(";")[1:]
        if stack.startswith(main) and frames and frames[0].startswith("<module> (") and "step_profile" in frames[0]:
            main_samples += int(count)  # the main thread's, idle ones included: its wall time
            for frame in {f.rsplit(":", 1)[0] for f in frames}:
                inclusive[frame] += int(count)
    return {"samples_by_process": per_process.most_common(24), "main_samples": main_samples,
            "main_top": [(k, round(v / max(1, main_samples), 3)) for k, v in inclusive.most_common(top)]}


def run(args, name: str, label: str, deadline: float) -> dict:
    kind, spec_path, extra = train_speed.CONFIGS[name]
    if kind != "plain":
        raise SystemExit(f"{name}: only plain-process configurations can be profiled here")
    trace, marker, result = (args.work / f"{label}{suffix}" for suffix in (".trace.json", ".first_step", ".json"))
    for path in (trace, marker, result):
        path.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--work", str(args.work), "--device", args.device, "--one", name,
               "--label", label, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    started = time.time()
    log = open(args.work / f"{label}.log", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=train_speed.REPO)
    raw = args.work / f"{label}.spy.txt"
    spy = None
    if Path(train_speed.py_spy()).exists():
        spy = subprocess.Popen([train_speed.py_spy(), "record", "--pid", str(proc.pid), "--subprocesses", "--idle",
                                "--rate", "50", "--nonblocking", "--format", "raw", "-o", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    if spy:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
    try:
        rc = proc.wait(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = -9
    log.close()
    outcome = json.loads(result.read_text()) if result.is_file() else {}
    first_step_s = float(marker.read_text()) - started if marker.exists() else None
    report = {"config": name, "rc": rc, "first_step_s": first_step_s, "compile": outcome.get("compile"),
              "steps": outcome.get("steps")}
    if raw.is_file():
        with open(raw, "rb") as src, gzip.open(args.out / f"{label}.spy.txt.gz", "wb") as dst:
            dst.write(src.read())
    try:
        report["spy_first_step"] = spy_summary(raw, proc.pid)
    except Exception as error:  # py-spy's output format is not ours: keep the rest
        report["spy_first_step"] = {"error": repr(error)}
    if trace.is_file():
        try:
            report["profile"] = analyse(trace, args.steps)
        except Exception as error:  # keep the run's other findings and the trace itself
            report["profile"] = {"error": repr(error)}
        packed = args.out / f"{label}.trace.json.gz"
        with open(trace, "rb") as src, gzip.open(packed, "wb") as dst:
            dst.write(src.read())
        if packed.stat().st_size > 15 * 2**20:  # over what comes back from the GPU machine: the summary must do
            packed.unlink()
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/train_speed"))
    parser.add_argument("--configs", default="plain-fast-compiled,plain-fast")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps profiled (0: py-spy over the first "
                                                                 "step only, no torch.profiler)")
    parser.add_argument("--deadline", type=float, default=540)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (with --device cpu: a dry run)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--label", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, spec_path, extra = train_speed.CONFIGS[args.one]
        cpu = ["model.attn_implementation=sdpa"] if args.device == "cpu" else []
        callback = profiler_callback(args.warmup, args.steps, args.work / f"{args.label}.trace.json",
                                     args.work / f"{args.label}.first_step")
        return train_speed.run_variant(args.work, args.warmup + args.steps, args.work / f"{args.label}.json",
                                       args.device, spec_path, [*extra, *cpu], callbacks=[callback])
    deadline = time.monotonic() + args.deadline
    train_speed.prepare(args)
    reports = []
    for index, name in enumerate(args.configs.split(",")):
        reports.append(run(args, name, f"profile-{index}-{name}", deadline))
        print(json.dumps(reports[-1], indent=1), flush=True)
        (args.out / "step_profile.json").write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()

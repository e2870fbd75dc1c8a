"""Host time per optimizer step: the 4-bit base against `training.dequantize_base`, on CPU.

    .venv/bin/python bench/host_step.py [--repeats 3] [--steps 14] [--compiled] [--thread]

On an H200 the fast step is bound by the host issuing kernels (bench/RESULTS.md, "Stop 28"): what the step costs in
Python and dispatch sets its speed. This measures that cost where it can be measured without a GPU: the tiny model
widened to llm-jp-3-1.8b's 24 decoder layers (so the same 168 LoRA-wrapped 4-bit layers and the same per-layer
host work) but 64 wide, rows cut to 8 tokens, one torch thread, so the arithmetic is small next to the host work.
The step is the fast spec's: 64 rows in one padding-free pass, gradient checkpointing, LoRA on all linear layers
with embed_tokens. Each configuration runs --repeats times, interleaved, each in its own process; a run's figure is
the median gap between optimizer steps after 4 warm-up steps. The GPU's own figure is bench/gpu/train_speed.py's.

--thread compares the dequantized base trained in the main thread with the same trained in a thread of its own, as
Ray Train runs a train function: is Python slower outside the main thread?
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "quickstart.yaml"
LAYERS, WIDTH = 24, 64
WARMUP = 4
DENSE = "training.dequantize_base=true"
IN_THREAD = "in a thread"  # not a spec override: one_run trains in a thread of its own
CONFIGS = {"4-bit base": [], "dequantize_base": [DENSE]}
THREAD_CONFIGS = {"main thread": [DENSE], "own thread": [DENSE, IN_THREAD]}


def build_model(out: Path) -> Path:
    """The tiny model's tokenizer with a random-init Llama of 24 layers, 64 wide."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ray_sft import tiny

    base = Path(tiny.ensure_tiny_model(str(REPO / "jobs" / "data" / "dolly-ja-mini.jsonl")))
    config = AutoConfig.from_pretrained(base)
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = LAYERS, WIDTH, 2 * WIDTH
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for f in base.iterdir():
        if "token" in f.name:
            shutil.copy(f, out / f.name)
    return out


def one_run(model: Path, steps: int, compiled: bool, extra: list[str], result: Path) -> None:
    import torch
    from transformers import TrainerCallback

    from ray_sft import data, modeling, spec, train

    torch.set_num_threads(1)
    threaded = IN_THREAD in extra
    extra = [e for e in extra if e != IN_THREAD]
    job = spec.load(JOB, [
        f"model.name_or_path={model}", "data.max_rows=1000", "data.eval_rows=0", "data.on_bad_rows=truncate",
        "training.max_length=8", "training.per_device_batch_size=4", "training.gradient_accumulation_steps=16",
        "training.micro_batch_size=64", "training.padding_free=true", f"training.max_steps={steps}",
        "training.logging_steps=1", "training.save_steps=1000", "training.eval_steps=1000",
        "model.attn_implementation=sdpa", f"training.compile={str(compiled).lower()}", *extra])
    tokenizer = modeling.load_tokenizer(str(model), job.model)
    rows = data.load_examples(job, tokenizer).train
    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        trainer = train.build_trainer(job, str(model), tokenizer, rows, [], "cpu", out, callbacks=[StepEnds()])
        trainer.args.save_strategy = "no"
        if threaded:
            sys.path.insert(0, str(REPO / "bench" / "gpu"))
            from train_speed import in_thread  # one helper for both benches: raises what the thread raised

            in_thread(trainer.train)
        else:
            trainer.train()
    gaps = [b - a for a, b in zip(ends[WARMUP:], ends[WARMUP + 1:])]
    result.write_text(json.dumps({"s_per_step": statistics.median(gaps), "steps": len(gaps)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--compiled", action="store_true", help="training.compile=true (inductor on CPU)")
    parser.add_argument("--thread", action="store_true", help="main thread against a thread of its own")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    configs = THREAD_CONFIGS if args.thread else CONFIGS
    if args.one:
        return one_run(args.model, args.steps, args.compiled, configs[args.one], args.result)

    runs: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as work:
        model = build_model(Path(work) / "model")
        for _ in range(args.repeats):  # interleaved: a b a b ...
            for name in configs:
                result = Path(work) / "result.json"
                command = [sys.executable, __file__, "--one", name, "--model", str(model), "--result", str(result),
                           "--steps", str(args.steps), *(["--compiled"] if args.compiled else []),
                           *(["--thread"] if args.thread else [])]
                subprocess.run(command, check=True, capture_output=True)
                runs[name].append(json.loads(result.read_text())["s_per_step"])
                print(f"{name}: {runs[name][-1] * 1e3:.0f} ms/step", flush=True)
    first = next(iter(configs))
    base = statistics.median(runs[first])
    step = "compiled" if args.compiled else "eager"
    print(f"\n{LAYERS} layers x {WIDTH} wide, 64 rows of 8 tokens per step, {step}, {args.repeats} runs each, "
          "interleaved")
    print(f"| config | ms per step, median (min-max) | vs {first} |\n|---|---|---:|")
    for name, values in runs.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.0f} ({min(values) * 1e3:.0f}-{max(values) * 1e3:.0f}) | "
              f"{base / median:.2f}x |")


if __name__ == "__main__":
    main()

"""QLoRA training speed on llm-jp-3-1.8b's shape: the recipe in plain TRL vs `ray-sft train` vs fast settings.

One command on the GPU machine runs everything side by side (same model, data, seed, rows per step), each run in
its own process with its own deadline, then prints a table and writes JSON to --out:

    python bench/gpu/train_speed.py --out $OUT --runs recipe,ray,fast            # (a), (b), (c)
    python bench/gpu/train_speed.py --out $OUT --runs ladder                     # each fast change alone

The model is random-init (no weights can be downloaded there): throughput does not depend on the values. The data
are synthetic instruction rows whose token counts follow dolly-ja's shape (lognormal, median about 150, long tail
cut at 1024). A word-level tokenizer makes every synthetic word exactly one token, so lengths are exact.
Throughput is trained (non-pad) tokens over the optimizer steps after the first (warm-up) up to TIMED_LAST, the
same steps for every run, so every run times the same rows.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE_SPEC = REPO / "jobs" / "llm-jp-3-1.8b-dolly-ja.yaml"
FAST_SPEC = REPO / "jobs" / "llm-jp-3-1.8b-dolly-ja-fast.yaml"
SHAPE = dict(hidden_size=2048, intermediate_size=7168, num_hidden_layers=24, num_attention_heads=16,
             num_key_value_heads=16, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
             tie_word_embeddings=False)
VOCAB = 99584
TINY_SHAPE = dict(SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4)  # --tiny: a CPU dry run of the whole script
ROWS = 1024
TIMED_FIRST, TIMED_LAST = 1, 4  # time steps 2..4: step 1 warms up, the last step of a Ray run also saves
# Each change of the fast settings alone, in order (plain process through ray_sft's own trainer).
LADDER = {
    "recipe spec, no Ray": [],  # (b) without Ray: what Ray itself costs, apart from ray_sft's trainer
    "micro 64, padded": ["training.micro_batch_size=64", "training.padding_free=false",
                         "model.attn_implementation=sdpa"],
    "micro 64, padding-free, sdpa": ["training.micro_batch_size=64", "training.padding_free=true",
                                     "model.attn_implementation=sdpa"],
    "micro 64, padding-free, varlen": ["training.micro_batch_size=64", "training.padding_free=true",
                                       "model.attn_implementation=varlen"],
    "micro 32, padding-free, varlen, no ckpt": ["training.micro_batch_size=32", "training.padding_free=true",
                                                "model.attn_implementation=varlen",
                                                "training.gradient_checkpointing=false"],
}


# ---------------------------------------------------------------------------------------------------------------
# Model, tokenizer, data


def setup(work: Path, tiny: bool) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = [f"w{i}" for i in range(VOCAB - 600)]  # the model's vocabulary stays 99584; some ids never occur
    vocab = {t: i for i, t in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(work / "model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         **(TINY_SHAPE if tiny else SHAPE))
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(work / "model")

    rng = random.Random(0)
    rows, lengths = [], []
    for _ in range(ROWS):
        # dolly-ja under llm-jp's tokenizer: lognormal, median about 150 tokens, long tail, cut at 1024.
        total = min(1024, max(24, int(rng.lognormvariate(math.log(150), 0.75))))
        if tiny:  # CPU dry run: short rows keep the 99,584-wide LM head affordable on 2 cores
            total = 24 + total // 16
        instruction = rng.randint(4, max(5, total // 4))
        response = total - instruction - 12  # the recipe template adds about a dozen (unknown-word) tokens
        pick = lambda n: " ".join(rng.choice(words) for _ in range(max(1, n)))  # noqa: E731
        rows.append({"instruction": pick(instruction), "context": "", "response": pick(response)})
        lengths.append(total)
    with open(work / "data.jsonl", "w") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    lengths.sort()
    (work / "data_stats.json").write_text(json.dumps({
        "rows": ROWS, "median": lengths[ROWS // 2], "mean": sum(lengths) / ROWS, "p90": lengths[int(ROWS * 0.9)],
        "max": lengths[-1]}))


def overrides(work: Path, steps: int, name: str, device: str) -> list[str]:
    """What every run shares: the synthetic model and data, a fixed step count, a loss log on every step."""
    return [f"model.name_or_path={work / 'model'}", f"data.source={work / 'data.jsonl'}", "data.max_rows=1024",
            f"training.max_steps={steps}", "training.logging_steps=1", f"training.save_steps={steps}",
            f"training.eval_steps={steps}", f"output.dir={work / 'runs'}", f"output.name={name}",
            "scaling.use_gpu=" + ("true" if device == "cuda" else "false")] + (
                [] if device == "cuda" else ["scaling.cpus_per_worker=1", "training.bf16=false"])


# ---------------------------------------------------------------------------------------------------------------
# One run per process


def step_recorder(records: list):
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                records.append({"step": state.global_step, "time": time.monotonic(), "loss": logs["loss"],
                                "num_tokens": logs.get("num_tokens")})

    return Record()


def run_recipe(work: Path, steps: int, result: Path, device: str) -> None:
    """(a) The notebook's training, in plain TRL, one process, no ray_sft code."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer
    import datasets

    from ray_sft.templates import TRAIN_TEMPLATES

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(
        work / "model", device_map={"": device}, dtype=torch.bfloat16, attn_implementation="sdpa",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    model.config.use_cache = False
    if device == "cpu":
        from ray_sft.modeling import disable_cpu_repack

        disable_cpu_repack(model)  # the CPU dry run only: see modeling.disable_cpu_repack
    rows = [json.loads(line) for line in open(work / "data.jsonl")][:1024]
    template = TRAIN_TEMPLATES["recipe"]
    texts = [template.format(instruction=r["instruction"], response=r["response"], context="") + tokenizer.eos_token
             for r in rows]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    records: list = []
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=datasets.Dataset.from_dict({"text": texts}),
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                               target_modules=targets, modules_to_save=["embed_tokens"]),
        args=SFTConfig(output_dir=str(work / "runs" / "recipe-plain"), num_train_epochs=3, max_steps=steps,
                       per_device_train_batch_size=4, gradient_accumulation_steps=16, learning_rate=2e-4,
                       lr_scheduler_type="cosine", weight_decay=0.01, warmup_steps=100, optim="adamw_torch_fused",
                       bf16=device == "cuda", train_sampling_strategy="group_by_length", logging_steps=1,
                       auto_find_batch_size=True,
                       save_strategy="no", max_length=1024, packing=False, neftune_noise_alpha=5,
                       gradient_checkpointing=True, dataset_text_field="text", seed=42, data_seed=42,
                       report_to="none", disable_tqdm=True, use_cpu=device == "cpu"),
        callbacks=[step_recorder(records)])
    trainer.train()
    write_result(result, records, peak_gib(device))


def run_variant(work: Path, steps: int, result: Path, device: str, extra: list[str]) -> None:
    """A ladder step: ray_sft's trainer (train.build_trainer) in a plain process, the recipe spec + `extra`."""
    from ray_sft import data, modeling, spec, train

    job = spec.load(RECIPE_SPEC, overrides(work, steps, "variant", device) + extra)
    tokenizer = modeling.load_tokenizer(str(work / "model"), job.model)
    examples = data.load_examples(job, tokenizer)
    records: list = []
    trainer = train.build_trainer(job, str(work / "model"), tokenizer, examples.train, [], device,
                                  str(work / "runs" / "variant"), callbacks=[step_recorder(records)])
    trainer.args.save_strategy = "no"
    trainer.train()
    write_result(result, records, peak_gib(device))


def peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def write_result(result: Path, records: list, peak: float | None) -> None:
    result.write_text(json.dumps({"steps": records, "peak_gib": peak}))


def ray_run(work: Path, spec_path: Path, name: str, steps: int, device: str, deadline: float, extra=()) -> dict:
    """`ray-sft train` as a user runs it; the steps' timings come from the run's metrics.jsonl (worker clocks)."""
    command = [sys.executable, "-m", "ray_sft.cli", "train", str(spec_path),
               *overrides(work, steps, name, device), *extra]
    proc = run_logged(command, work / f"{name}.log", deadline)
    # Read even after a failure: the steps' records are written as they happen (a missing plotting library on the
    # GPU image, say, fails the run only after training).
    path = work / "runs" / name / "metrics.jsonl"
    metrics = [json.loads(line) for line in open(path)] if path.is_file() else []
    steps_, elapsed = [], 0.0
    for m in metrics:
        if "loss" not in m:
            continue
        # tokens_per_s is measured on the worker between consecutive reports: recover each step's duration.
        new = m["num_tokens"] - (steps_[-1]["num_tokens"] if steps_ else 0)
        elapsed += new / m["tokens_per_s"]
        steps_.append({"step": m["step"], "time": elapsed, "loss": m["loss"], "num_tokens": m["num_tokens"]})
    peak = max((m["gpu_peak_gib"] for m in metrics if "gpu_peak_gib" in m), default=None)
    return {"steps": steps_, "peak_gib": peak, "rc": proc}


def run_logged(command: list[str], log: Path, deadline: float) -> int:
    budget = deadline - time.monotonic()
    if budget < 30:
        log.write_text("skipped: no time left before the deadline\n")
        return -1
    with open(log, "w") as out:
        try:
            return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=budget, cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\nkilled at the deadline ({budget:.0f}s)\n")
            return -9


def plain_run(work: Path, kind: str, steps: int, device: str, deadline: float, name: str, extra=()) -> dict:
    result = work / f"{name}.json"
    command = [sys.executable, __file__, "--work", str(work), "--device", device, "--one", kind,
               "--steps", str(steps), "--result", str(result), *[f"--extra={e}" for e in extra]]
    rc = run_logged(command, work / f"{name}.log", deadline)
    outcome = json.loads(result.read_text()) if rc == 0 else {"steps": [], "peak_gib": None}
    return {**outcome, "rc": rc}


# ---------------------------------------------------------------------------------------------------------------
# Summary


def summarise(outcome: dict) -> dict:
    by_step = {s["step"]: s for s in outcome["steps"]}
    if TIMED_FIRST not in by_step or TIMED_LAST not in by_step:
        return {"tokens_per_s": None, "s_per_step": None, "peak_gib": outcome.get("peak_gib"), "rc": outcome["rc"]}
    first, last = by_step[TIMED_FIRST], by_step[TIMED_LAST]
    seconds = last["time"] - first["time"]
    return {"tokens_per_s": (last["num_tokens"] - first["num_tokens"]) / seconds,
            "s_per_step": seconds / (TIMED_LAST - TIMED_FIRST),
            "tokens_per_step": (last["num_tokens"] - first["num_tokens"]) / (TIMED_LAST - TIMED_FIRST),
            "peak_gib": outcome.get("peak_gib"), "losses": [s["loss"] for s in outcome["steps"]], "rc": outcome["rc"]}


def table(rows: dict, reference: str | None) -> str:
    base = rows.get(reference, {}).get("tokens_per_s") if reference else None
    lines = ["| run | trained tokens/s | s/step | peak GiB | vs " + (reference or "-") + " |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        tps = r.get("tokens_per_s")
        ratio = f"{tps / base:.2f}x" if tps and base else "-"
        lines.append(f"| {name} | {tps:,.0f} | {r['s_per_step']:.2f} | {r['peak_gib'] or 0:.1f} | {ratio} |"
                     if tps else f"| {name} | failed (rc {r['rc']}) | - | - | - |")
    return "\n".join(lines)


def environment() -> dict:
    import torch
    import transformers
    import trl
    import peft

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    return info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/train_speed"))
    parser.add_argument("--runs", default="recipe,ray,fast")
    parser.add_argument("--deadline", type=float, default=560, help="seconds for the whole script")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: dry-run the script")
    parser.add_argument("--loss-steps", type=int, default=10)
    parser.add_argument("--ladder", default="all", help="ladder entries to run: 'all' or indices like 0+3")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--extra", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one == "recipe":
        return run_recipe(args.work, args.steps, args.result, args.device)
    if args.one == "variant":
        return run_variant(args.work, args.steps, args.result, args.device, args.extra)

    deadline = time.monotonic() + args.deadline
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if not (args.work / "data.jsonl").is_file():
        setup(args.work, args.tiny)
    print(f"setup {time.monotonic() - started:.0f}s", json.loads((args.work / "data_stats.json").read_text()),
          flush=True)
    runs = args.runs.split(",")
    rows, reference = {}, None
    short = TIMED_LAST + 1
    if "recipe" in runs:
        reference = "(a) recipe, plain TRL"
        rows[reference] = summarise(plain_run(args.work, "recipe", args.loss_steps, args.device, deadline, "a"))
    if "ray" in runs:
        rows["(b) ray-sft train, recipe spec"] = summarise(
            ray_run(args.work, RECIPE_SPEC, "b", short, args.device, deadline))
    if "fast" in runs:
        cpu = ["model.attn_implementation=sdpa"] if args.device == "cpu" else []  # varlen is CUDA-only
        rows["(c) ray-sft train, fast spec"] = summarise(
            ray_run(args.work, FAST_SPEC, "c", args.loss_steps, args.device, deadline, cpu))
    if "ladder" in runs:
        chosen = range(len(LADDER)) if args.ladder == "all" else [int(i) for i in args.ladder.split("+")]
        for i, (name, extra) in enumerate(LADDER.items()):
            if i not in chosen:
                continue
            if args.device == "cpu" and "varlen" in name:
                continue  # torch's varlen kernel is CUDA-only
            rows[name] = summarise(plain_run(args.work, "variant", short, args.device, deadline, f"l{i}", extra))
        reference = reference or next(iter(rows))
        for name, r in rows.items():
            print(name, "->", r, flush=True)
    report = {"environment": environment(), "data": json.loads((args.work / "data_stats.json").read_text()),
              "timed_steps": [TIMED_FIRST + 1, TIMED_LAST], "runs": rows,
              "wall_s": time.monotonic() - started}
    a, c = rows.get("(a) recipe, plain TRL", {}), rows.get("(c) ray-sft train, fast spec", {})
    if a.get("losses") and c.get("losses"):
        report["loss_first_steps"] = {"recipe": a["losses"], "fast": c["losses"],
                                      "max_abs_diff": max(abs(x - y) for x, y in zip(a["losses"], c["losses"]))}
    (args.out / f"train_speed_{'_'.join(runs)}.json").write_text(json.dumps(report, indent=1))
    # One file for every run's log tail: what comes back from the GPU machine is limited to a few files.
    with open(args.out / f"logs_{'_'.join(runs)}.txt", "w") as out:
        for log in sorted(args.work.glob("*.log")):
            out.write(f"===== {log.name}\n{log.read_text()[-3000:]}\n")
    if "loss_first_steps" in report:
        loss = report["loss_first_steps"]
        print("loss per step, recipe:", " ".join(f"{x:.4f}" for x in loss["recipe"]))
        print("loss per step, fast:  ", " ".join(f"{x:.4f}" for x in loss["fast"]))
        print(f"max |diff| {loss['max_abs_diff']:.4f}")
    print(json.dumps(report["environment"]))
    print(table(rows, reference))


if __name__ == "__main__":
    main()

"""QLoRA training speed on llm-jp-3-1.8b's shape: the recipe in plain TRL, ray_sft with and without Ray,
fast settings with and without the compiled layers. Every configuration runs --repeats times, interleaved
(a b c a b c ...), each in its own process; the table gives the median and min-max of each configuration, with
ratios taken within this one call:

    python bench/gpu/train_speed.py --out $OUT --configs plain-fast,ray-fast,plain-fast-compiled --repeats 3

On a machine with several GPUs, `--gpus N` runs each repeat's configurations at once, one per GPU, and moves each
configuration to the next GPU in the next repeat, so the recipe's slow configurations (7-11 s per step) fit
one call: `--configs recipe,plain-recipe,ray-recipe --gpus 3 --repeats 3`.

The model is random-init (no weights can be downloaded there): throughput does not depend on the values. The data
are synthetic instruction rows whose token counts follow dolly-ja's shape (lognormal, median about 150, long tail
cut at 1024). A word-level tokenizer makes every synthetic word exactly one token, so lengths are exact.
Throughput is trained (non-pad) tokens over --timed optimizer steps after --warmup steps, the same steps (so the
same rows) in every run; the GPU-busy fraction is nvidia-smi's utilization sampled every 100 ms over those steps.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import shutil
import statistics
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
COMPILED = ["training.compile=true"]
DENSE = ["training.dequantize_base=true"]
# The fast spec dequantizes its base since stop 31; before, every fast configuration trained on the 4-bit base.
# The `-4bit` configurations re-run that base (bench/RESULTS.md: stops 22-31 name them without the suffix).
FOUR_BIT = ["training.dequantize_base=false"]
NO_DROPOUT = ["lora.dropout=0"]
# Not a spec field: the bench process sets torch._inductor.config.fallback_random, so the compiled layers draw
# dropout masks through eager's random ops and leave the generator where eager leaves it.
EAGER_RNG = "bench.eager_rng=true"
# Not a spec field either: the varlen attention call runs outside the compiled graph (a graph break around it in
# every layer), the rest of each layer compiled. If the compiled curve then follows eager, the compiled call is it.
EAGER_ATTENTION = "bench.eager_attention=true"
# Not a spec field: the plain process trains in a thread of its own, as Ray Train runs a train function (its
# TrainingThread), not in the main thread. Is a thread what makes the Ray worker's step slower?
IN_THREAD = "bench.in_thread=true"
# Not a spec field: torch's intra-op threads set to the worker's CPUs in the plain process, as train.py sets them in
# a Ray Train worker (where Ray sets OMP_NUM_THREADS to them too); the plain process keeps one per core. With
# IN_THREAD, the two things a Ray Train worker has that a plain process lacks (comparing their environments):
# stop 31's plain process with both was as much slower than plain as `ray-sft train` was (ranges overlapping).
# Which of the two is it, if either?
RAY_THREADS = "bench.ray_threads=true"
# Not a spec field either: each compiled layer's gradient checkpointing traced into its graph, as transformers 5.24
# does inside a layer's forward (5.17, the device's, checkpoints around the compiled call, so the backward calls
# each layer again from Python). On the device's torch 2.11 inductor's partitioner fails on it, with graph-safe
# RNG functionalization on or off (bench/RESULTS.md, "Stop 30" and "Stop 31"): the first check on a newer torch.
TRACED_CHECKPOINT = "bench.traced_checkpoint=true"
# fp32 compute and fp32 trainable weights (flash attention is half-precision only, so sdpa over the packed rows):
# the recipe's arithmetic without bf16 rounding, the reference for which bf16 loss curve is the faithful one.
FP32 = ["training.bf16=false", "quantization.compute_dtype=float32", "model.attn_implementation=sdpa"]
# name -> (how it runs, spec, overrides). "recipe" is the notebook in plain TRL (no ray_sft code), "plain" is
# ray_sft's trainer in a plain process (what Ray costs is "ray" over "plain"), "ray" is `ray-sft train`.
CONFIGS = {
    "recipe": ("recipe", None, []),
    # The recipe with another seed (and so another data order, as the notebook's data_seed follows its seed): the
    # seed-to-seed spread of the first losses, the yardstick for any other run's loss curve.
    "recipe-seed7": ("recipe", None, ["seed=7"]),
    "plain-recipe": ("plain", RECIPE_SPEC, []),
    "ray-recipe": ("ray", RECIPE_SPEC, []),
    "plain-fast": ("plain", FAST_SPEC, []),
    "ray-fast": ("ray", FAST_SPEC, []),
    "plain-fast-4bit": ("plain", FAST_SPEC, FOUR_BIT),
    "ray-fast-4bit": ("ray", FAST_SPEC, FOUR_BIT),
    "plain-fast-compiled-4bit": ("plain", FAST_SPEC, COMPILED + FOUR_BIT),
    "ray-fast-compiled-4bit": ("ray", FAST_SPEC, COMPILED + FOUR_BIT),
    # The plain process inside a one-rank process group with torchrun's variables, as Ray Train sets up a single
    # worker (before train.leave_single_rank_group): what the group alone costs.
    "plain-fast-group": ("plain-group", FAST_SPEC, []),
    "plain-fast-compiled": ("plain", FAST_SPEC, COMPILED),
    "ray-fast-compiled": ("ray", FAST_SPEC, COMPILED),
    # Loss-curve checks: is a compiled run's curve the eager one once both draw the same random numbers?
    "plain-fast-nodrop": ("plain", FAST_SPEC, NO_DROPOUT),
    "plain-fast-compiled-nodrop": ("plain", FAST_SPEC, COMPILED + NO_DROPOUT),
    "plain-fast-compiled-eager-rng": ("plain", FAST_SPEC, COMPILED + [EAGER_RNG]),
    "plain-fast-fp32": ("plain", FAST_SPEC, FP32),
    # bf16 with sdpa over the packed rows instead of varlen (flash) attention: the fp32 pair (sdpa) parts only as
    # far as the recipe's seeds do, the bf16 pair (varlen) three times as far. Is it the compiled varlen call?
    "plain-fast-sdpa": ("plain", FAST_SPEC, ["model.attn_implementation=sdpa"]),
    "plain-fast-compiled-sdpa": ("plain", FAST_SPEC, COMPILED + ["model.attn_implementation=sdpa"]),
    "plain-fast-compiled-eager-attn": ("plain", FAST_SPEC, COMPILED + [EAGER_ATTENTION]),
    "plain-fast-compiled-fp32": ("plain", FAST_SPEC, COMPILED + FP32),
    "plain-fast-compiled-thread": ("plain", FAST_SPEC, COMPILED + [IN_THREAD]),
    # The frozen 4-bit weights dequantized once (training.dequantize_base): bitsandbytes' per-matmul Python and
    # dequantize kernels leave the host-bound step; the same numbers, about 2 GiB more for this model. Since the fast
    # spec sets it (stop 31) these equal the configurations without `-dense`; the names stay for stops 30-31's commands.
    "plain-fast-dense": ("plain", FAST_SPEC, DENSE),
    "ray-fast-dense": ("ray", FAST_SPEC, DENSE),
    "plain-fast-compiled-dense": ("plain", FAST_SPEC, COMPILED + DENSE),
    "ray-fast-compiled-dense": ("ray", FAST_SPEC, COMPILED + DENSE),
    "plain-fast-compiled-dense-raylike": ("plain", FAST_SPEC, COMPILED + DENSE + [RAY_THREADS, IN_THREAD]),
    "plain-fast-compiled-dense-threads": ("plain", FAST_SPEC, COMPILED + DENSE + [RAY_THREADS]),
    "plain-fast-compiled-dense-thread": ("plain", FAST_SPEC, COMPILED + DENSE + [IN_THREAD]),
    "plain-fast-compiled-dense-traced": ("plain", FAST_SPEC, COMPILED + DENSE + [TRACED_CHECKPOINT]),
    # The peer: unsloth on the same job (bench/gpu/unsloth_job.py, its own bundle: build_unsloth_bundle.sh),
    # padding-free as it runs on an H200 by default, and padded in 4 micro-batches of 16 rows.
    "unsloth": ("unsloth", None, []),
    "unsloth-padded": ("unsloth", None, ["--padded", "--micro-batch", "16"]),
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


def prepare(args) -> None:
    """--out and --work exist, and --work holds the synthetic model and rows (made once, reused by later scripts)."""
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "data.jsonl").is_file():
        setup(args.work, args.tiny)


def overrides(work: Path, steps: int, name: str, device: str) -> list[str]:
    """What every run shares: the synthetic model and data, a fixed step count, a loss log on every step."""
    return [f"model.name_or_path={work / 'model'}", f"data.source={work / 'data.jsonl'}", "data.max_rows=1024",
            f"training.max_steps={steps}", "training.logging_steps=1", f"training.save_steps={steps}",
            f"training.eval_steps={steps}", f"output.dir={work / 'runs'}", f"output.name={name}",
            "scaling.use_gpu=" + ("true" if device == "cuda" else "false")] + (
                [] if device == "cuda" else ["scaling.cpus_per_worker=1", "training.bf16=false"])


# ---------------------------------------------------------------------------------------------------------------
# One run per process


def steps_log(result: Path) -> Path:
    return result.with_suffix(".steps.jsonl")


def step_recorder(records: list, result: Path):
    """Each logged step's time, loss and token count, kept in `records` and appended to the run's steps log as it
    happens: a run killed at the deadline after its timed steps (while it exits) still has its figures."""
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                records.append({"step": state.global_step, "time": time.time(), "loss": logs["loss"],
                                "num_tokens": logs.get("num_tokens")})
                with open(steps_log(result), "a") as out:
                    out.write(json.dumps(records[-1]) + "\n")

    return Record()


def recipe_texts(work: Path, tokenizer) -> list[str]:
    """The bench's rows in the recipe's template plus EOS, as the notebook builds its training texts."""
    from ray_sft.templates import TRAIN_TEMPLATES

    template = TRAIN_TEMPLATES["recipe"]
    return [template.format(instruction=r["instruction"], response=r["response"], context="") + tokenizer.eos_token
            for r in map(json.loads, open(work / "data.jsonl"))][:ROWS]


def run_recipe(work: Path, steps: int, result: Path, device: str, extra: list[str]) -> None:
    """(a) The notebook's training, in plain TRL, one process, no ray_sft code. `extra` may hold "seed=N"."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer
    import datasets

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
    texts = recipe_texts(work, tokenizer)
    seed = int(dict(e.split("=", 1) for e in extra).get("seed", 42))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    records: list = []
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=datasets.Dataset.from_dict({"text": texts}),
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                               target_modules=targets, modules_to_save=["embed_tokens"]),
        args=SFTConfig(output_dir=str(work / "runs" / result.stem), num_train_epochs=3, max_steps=steps,
                       per_device_train_batch_size=4, gradient_accumulation_steps=16, learning_rate=2e-4,
                       lr_scheduler_type="cosine", weight_decay=0.01, warmup_steps=100, optim="adamw_torch_fused",
                       bf16=device == "cuda", train_sampling_strategy="group_by_length", logging_steps=1,
                       auto_find_batch_size=True,
                       save_strategy="no", max_length=1024, packing=False, neftune_noise_alpha=5,
                       gradient_checkpointing=True, dataset_text_field="text", seed=seed, data_seed=seed,
                       report_to="none", disable_tqdm=True, use_cpu=device == "cpu"),
        callbacks=[step_recorder(records, result)])
    trainer.train()
    write_result(result, records, peak_gib(device))


def run_variant(work: Path, steps: int, result: Path, device: str, spec_path: Path, extra: list[str],
                group: bool = False, callbacks=()) -> None:
    """ray_sft's trainer (train.build_trainer) in a plain process, no Ray: `spec_path` + `extra`."""
    from ray_sft import data, modeling, spec, train

    if group:
        join_one_rank_group(device)
    if EAGER_RNG in extra:
        import torch._inductor.config

        torch._inductor.config.fallback_random = True
    if EAGER_ATTENTION in extra:
        import torch

        # Registered with transformers when the model loads, under this module-level name.
        modeling.varlen_attention = torch.compiler.disable(modeling.varlen_attention)
    if TRACED_CHECKPOINT in extra:
        compile_layers = train.compile_layers
        train.compile_layers = lambda model: compile_layers(trace_checkpoints(model))
    ray_threads = RAY_THREADS in extra
    extra = [e for e in extra if e not in (EAGER_RNG, EAGER_ATTENTION, IN_THREAD, RAY_THREADS, TRACED_CHECKPOINT)]

    job = spec.load(spec_path, overrides(work, steps, result.stem, device) + extra)
    if ray_threads:
        import torch

        torch.set_num_threads(max(1, int(job.scaling.cpus_per_worker)))  # as train.py sets it in a worker
    tokenizer = modeling.load_tokenizer(str(work / "model"), job.model)
    examples = data.load_examples(job, tokenizer)
    records: list = []
    trainer = train.build_trainer(job, str(work / "model"), tokenizer, examples.train, [], device,
                                  str(work / "runs" / result.stem),
                                  callbacks=[step_recorder(records, result), *callbacks])
    trainer.args.save_strategy = "no"
    trainer.train()
    write_result(result, records, peak_gib(device))


def trace_checkpoints(model):
    """Move each checkpointed decoder layer's checkpointing from around its call into its forward (what
    transformers 5.24 does), so that torch.compile traces it; returns the model."""
    import torch
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    for layer in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]:
        if not layer.gradient_checkpointing:
            continue
        layer.gradient_checkpointing = False  # transformers' own wrapper now passes straight through

        def checkpointed(*args, _layer=layer, _forward=layer.forward, **kwargs):
            if _layer.training and torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        layer.forward = checkpointed
    return model


def in_thread(fn) -> None:
    """Run `fn` in a thread of its own and wait for it; its exception, if any, is raised here."""
    import threading

    failure: list[BaseException] = []

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: B036 - re-raised in the main thread
            failure.append(e)

    thread = threading.Thread(target=target, name="TrainingThread")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def join_one_rank_group(device: str) -> None:
    import socket

    import torch
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device == "cuda" else "gloo")


def peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def write_result(result: Path, records: list, peak: float | None) -> None:
    result.write_text(json.dumps({"steps": records, "peak_gib": peak, "compile": compile_report()}))


def compile_report() -> dict | None:
    """Where a compiled run's warm-up went (Dynamo's per-phase seconds) and what hit the compile caches: the
    warm-up is the compiled layers' whole cost, so it must be explained, not just timed. None if nothing compiled."""
    import torch._dynamo.utils as dynamo_utils

    if not dynamo_utils.counters["frames"]:
        return None
    return {"seconds": dynamo_utils.compile_times(repr="str", aggregate=True),
            "counters": {k: dict(v) for k, v in dynamo_utils.counters.items()
                         if k in ("frames", "stats", "aot_autograd", "inductor", "graph_break", "recompiles")}}


def ray_run(work: Path, spec_path: Path, name: str, steps: int, device: str, deadline: float, extra=(),
            probe=None, env=None) -> dict:
    """`ray-sft train` as a user runs it; step times are the worker's report timestamps (metrics.jsonl)."""
    command = [sys.executable, "-m", "ray_sft.cli", "train", str(spec_path),
               *overrides(work, steps, name, device), *extra]
    rc = run_logged(command, work / f"{name}.log", deadline, probe, env)
    # Read even after a failure: the steps' records are written as they happen.
    path = work / "runs" / name / "metrics.jsonl"
    metrics = [json.loads(line) for line in open(path)] if path.is_file() else []
    steps_ = [{"step": m["step"], "time": m["timestamp"], "loss": m["loss"], "num_tokens": m["num_tokens"]}
              for m in metrics if "loss" in m]
    peak = max((m["gpu_peak_gib"] for m in metrics if "gpu_peak_gib" in m), default=None)
    return {"steps": steps_, "peak_gib": peak, "rc": rc}


def run_logged(command: list[str], log: Path, deadline: float, probe=None, env=None) -> int:
    budget = deadline - time.monotonic()
    if budget < 30:
        log.write_text("skipped: no time left before the deadline\n")
        return -1
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        if probe:
            probe.start(proc.pid)
        try:
            return proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            proc.kill()
            out.write(f"\nkilled at the deadline ({budget:.0f}s)\n")
            return -9
        finally:
            if probe:
                probe.stop()


def py_spy() -> str:
    """py-spy, which Ray's dependencies bring: on PATH, or beside this Python when PATH lacks the bundle's bin."""
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


class Probe:
    """What runs in the training process while it trains: py-spy stacks of every thread and each thread's CPU time.

    The training process is the run's own process (plain) or its Ray Train worker (found by name under the run).
    """

    def __init__(self, kind: str, out: Path, seconds: float):
        self.kind, self.out, self.seconds = kind, out, seconds
        self.threads: list[tuple[float, dict]] = []
        self.running = False

    def start(self, pid: int) -> None:
        import threading

        self.running = True
        threading.Thread(target=self._watch, args=(pid,), daemon=True).start()

    def stop(self) -> None:
        self.running = False

    def _target(self, pid: int) -> int | None:
        if self.kind != "ray":
            return pid
        found = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
        return int(found[0]) if found else None

    def _watch(self, pid: int) -> None:
        target = None
        while self.running and target is None:
            target, _ = self._target(pid), time.sleep(1)
        # Wait for the training steps: the GPU is busy once the model is on it and stepping (no GPU: a CPU dry run,
        # where a fixed wait does).
        waited = 0.0
        while self.running and (GpuUtil.last or 0) < 20 and (GpuUtil.last is not None or waited < 30):
            time.sleep(0.5)
            waited += 0.5
        if not self.running:
            return
        status = Path(f"/proc/{target}/status").read_text()
        kept = ("Threads", "Cpus_allowed_list", "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")
        self.status = {k: v.strip() for k, _, v in (line.partition(":") for line in status.splitlines()) if k in kept}
        spy = subprocess.Popen([py_spy(), "record", "--pid", str(target), "--rate", "100", "--threads",
                                "--nonblocking", "--format", "raw", "--duration", str(int(self.seconds)),
                                "-o", str(self.out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first = self._thread_cpu(target)
        spy.wait()
        last = self._thread_cpu(target)
        self.thread_cpu_s = sorted(((last[t][0], round((last[t][1] - first.get(t, (None, 0))[1]) / os.sysconf(
            "SC_CLK_TCK"), 2)) for t in last), key=lambda x: -x[1])[:12]

    @staticmethod
    def _thread_cpu(pid: int) -> dict:
        cpu = {}
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                comm = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                cpu[task.name] = (comm, int(fields[11]) + int(fields[12]))
        return cpu

    def summary(self) -> dict:
        """The hottest stacks' leaf frames per thread, from py-spy's raw output (stack;stack;... count)."""
        leaves: dict[str, int] = {}
        total = 0
        if self.out.is_file():
            for line in self.out.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                frames = stack.split(";")
                key = frames[0] + " > " + " > ".join(frames[-3:])
                leaves[key] = leaves.get(key, 0) + int(count)
                total += int(count)
        top = sorted(leaves.items(), key=lambda x: -x[1])[:40]
        return {"status": getattr(self, "status", None), "thread_cpu_s": getattr(self, "thread_cpu_s", None),
                "samples": total, "top": top}


def plain_run(work: Path, kind: str, steps: int, device: str, deadline: float, name: str, spec_path=None,
              extra=(), probe=None, env=None) -> dict:
    result = work / f"{name}.json"
    command = [sys.executable, __file__, "--work", str(work), "--device", device, "--one", kind,
               "--steps", str(steps), "--result", str(result), *[f"--extra={e}" for e in extra]]
    if spec_path:
        command.append(f"--spec={spec_path}")
    steps_log(result).unlink(missing_ok=True)
    rc = run_logged(command, work / f"{name}.log", deadline, probe, env)
    if rc == 0:
        outcome = json.loads(result.read_text())
    else:  # read even after a failure, as a Ray run's metrics.jsonl is
        log = steps_log(result)
        outcome = {"steps": [json.loads(line) for line in open(log)] if log.is_file() else [], "peak_gib": None}
    return {**outcome, "rc": rc}


def unsloth_run(args, steps: int, deadline: float, name: str, extra=(), env=None) -> dict:
    """unsloth_job.py in its own process, the unsloth bundle first on its path; its result file is read even after
    a failure (it then says why and which hosts unsloth tried to reach)."""
    result = args.work / f"{name}.json"
    command = [sys.executable, str(Path(__file__).with_name("unsloth_job.py")), "--work", str(args.work),
               "--steps", str(steps), "--result", str(result), "--device", args.device, *extra]
    env = dict(env or os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(args.unsloth_site), env.get("PYTHONPATH")) if p)
    rc = run_logged(command, args.work / f"{name}.log", deadline, env=env)
    outcome = json.loads(result.read_text()) if result.is_file() else {"steps": [], "peak_gib": None}
    return {**outcome, "rc": rc}


class GpuUtil:
    last: float | None = None  # the latest sample, for Probe


class GpuBusy:
    """nvidia-smi's utilization.gpu of every GPU every 100 ms, each sample stamped with the wall clock on arrival."""

    def __init__(self):
        self.samples: list[tuple[float, int, float]] = []  # (wall clock, GPU index, utilization %)
        self.proc = None

    def __enter__(self):
        import threading

        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,utilization.gpu",
                                          "--format=csv,noheader,nounits", "-lms", "100"],
                                         stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                gpu, utilization = (float(x) for x in line.split(","))
                self.samples.append((time.time(), int(gpu), utilization))
                GpuUtil.last = utilization

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()

    def between(self, start: float, end: float, gpu: int = 0) -> float | None:
        inside = [u for t, g, u in self.samples if start <= t <= end and g == gpu]
        return sum(inside) / len(inside) / 100 if inside else None


# ---------------------------------------------------------------------------------------------------------------
# Summary


def summarise(outcome: dict, first: int, last: int, busy: GpuBusy, gpu: int = 0) -> dict:
    by_step = {s["step"]: s for s in outcome["steps"]}
    if first not in by_step or last not in by_step:
        return {"tokens_per_s": None, "rc": outcome["rc"],
                **{k: outcome[k] for k in ("error", "fetch_attempts") if k in outcome}}
    a, b = by_step[first], by_step[last]
    seconds = b["time"] - a["time"]
    return {"tokens_per_s": (b["num_tokens"] - a["num_tokens"]) / seconds, "s_per_step": seconds / (last - first),
            "tokens_per_step": (b["num_tokens"] - a["num_tokens"]) / (last - first),
            "warmup_s": a["time"] - outcome["started"], "gpu_busy": busy.between(a["time"], b["time"], gpu), "gpu": gpu,
            "peak_gib": outcome.get("peak_gib"), "losses": [s["loss"] for s in outcome["steps"]],
            "rc": outcome["rc"], "compile": outcome.get("compile")}


def spread(values: list[float]) -> dict:
    values = sorted(v for v in values if v is not None)
    return {"median": statistics.median(values), "min": values[0], "max": values[-1]} if values else {}


def table(summary: dict, reference: str | None) -> str:
    base = summary.get(reference, {}).get("tokens_per_s", {}).get("median") if reference else None
    lines = [f"| config | trained tokens/s, median (min-max) | s/step | GPU busy | peak GiB | vs {reference} |",
             "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        tps = s["tokens_per_s"]
        if not tps:
            lines.append(f"| {name} | failed | - | - | - | - |")
            continue
        ratio = f"{tps['median'] / base:.2f}x" if base else "-"
        busy = f"{s['gpu_busy']['median']:.0%}" if s["gpu_busy"] else "-"
        lines.append(f"| {name} | {tps['median']:,.0f} ({tps['min']:,.0f}-{tps['max']:,.0f}) | "
                     f"{s['s_per_step']['median']:.3f} | {busy} | {s['peak_gib'] or 0:.1f} | {ratio} |")
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


def run_config(args, name: str, label: str, deadline: float, probe=None, timed=None, gpu=None) -> dict:
    kind, spec_path, extra = CONFIGS[name]
    cpu = ["model.attn_implementation=sdpa"] if args.device == "cpu" else []  # varlen is CUDA-only
    warmup = args.recipe_warmup if kind == "recipe" or spec_path == RECIPE_SPEC else args.warmup
    steps = warmup + (timed or args.timed) + (1 if kind == "ray" else 0)  # a Ray run's last step saves: untimed
    env = None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
    started = time.time()
    if kind == "unsloth":
        outcome = unsloth_run(args, steps, deadline, label, extra, env)
    elif kind == "ray":
        outcome = ray_run(args.work, spec_path, label, steps, args.device, deadline, [*extra, *cpu], probe, env)
    else:
        one = {"recipe": "recipe", "plain": "variant", "plain-group": "variant-group"}[kind]
        outcome = plain_run(args.work, one, steps, args.device, deadline, label, spec_path, [*extra, *cpu], probe,
                            env)
    return {**outcome, "started": started, "warmup": warmup}


def rounds(args, names: list[str], index: int, deadline: float, busy: GpuBusy):
    """Repeat `index` of every configuration: one after another on one GPU, or with --gpus N all at once, one per
    GPU, each configuration on the next GPU in the next repeat (over N repeats each runs on every GPU once)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(position: int, name: str) -> tuple[str, dict]:
        gpu = (position + index) % args.gpus if args.gpus > 1 else None
        outcome = run_config(args, name, f"{name}-{index}", deadline, gpu=gpu)
        return name, summarise(outcome, outcome["warmup"], outcome["warmup"] + args.timed, busy, gpu or 0)

    with ThreadPoolExecutor(len(names) if args.gpus > 1 else 1) as pool:  # one worker: one after another
        yield from pool.map(one, range(len(names)), names)


def profile(args, names: list[str], deadline: float) -> dict:
    """One untimed run per configuration with a Probe on its training process (py-spy slows what it samples)."""
    found = {}
    for name in names:
        probe = Probe(CONFIGS[name][0], args.work / f"profile-{name}.txt", args.profile_seconds)
        outcome = run_config(args, name, f"profile-{name}", deadline, probe, timed=args.profile_steps)
        found[name] = {**probe.summary(), "rc": outcome["rc"]}
        print(f"profile {name}: {found[name]['status']} cpu by thread {found[name]['thread_cpu_s']}", flush=True)
    return found


def write_report(args, runs: dict, profiles: dict, started: float) -> dict:
    summary = {name: {key: spread([r.get(key) for r in rs]) for key in ("tokens_per_s", "s_per_step", "gpu_busy")}
               | {"peak_gib": max((r.get("peak_gib") or 0 for r in rs), default=None)}
               for name, rs in runs.items()}
    order = "interleaved" if args.gpus == 1 else f"rounds over {args.gpus} GPUs, rotating"
    report = {"environment": environment(), "data": json.loads((args.work / "data_stats.json").read_text()),
              "warmup_steps": args.warmup, "timed_steps": args.timed, "repeats": args.repeats, "order": order,
              "summary": summary, "runs": runs, "profiles": profiles, "wall_s": time.monotonic() - started}
    (args.out / "train_speed.json").write_text(json.dumps(report, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/train_speed"))
    parser.add_argument("--configs", default="plain-fast,ray-fast", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (compile, caches)")
    parser.add_argument("--recipe-warmup", type=int, default=1, help="the same for the recipe's configurations")
    parser.add_argument("--timed", type=int, default=10, help="optimizer steps timed after the warm-up")
    parser.add_argument("--deadline", type=float, default=560, help="seconds for the whole script")
    parser.add_argument("--profile", default="", help="configs to run once, untimed, under py-spy first")
    parser.add_argument("--profile-seconds", type=float, default=8)
    parser.add_argument("--profile-steps", type=int, default=25)
    parser.add_argument("--gpus", type=int, default=1,
                        help="run each repeat's configurations at once, one per GPU (at most this many configs)")
    parser.add_argument("--unsloth-site", type=Path, default=Path("/tmp/unsloth_site"),
                        help="where the unsloth bundle is unpacked (put first on the unsloth runs' path)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: dry-run the script")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--extra", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one == "recipe":
        return run_recipe(args.work, args.steps, args.result, args.device, args.extra)
    if args.one in ("variant", "variant-group"):
        variant = functools.partial(run_variant, args.work, args.steps, args.result, args.device, args.spec,
                                    args.extra, group=args.one == "variant-group")
        return in_thread(variant) if IN_THREAD in args.extra else variant()

    deadline = time.monotonic() + args.deadline
    started = time.monotonic()
    prepare(args)
    print(f"setup {time.monotonic() - started:.0f}s", json.loads((args.work / "data_stats.json").read_text()),
          flush=True)
    names = args.configs.split(",")
    profiled = [n for n in args.profile.split(",") if n]
    unknown = [n for n in names + profiled if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    if args.gpus > 1 and (len(names) > args.gpus or args.profile):
        parser.error(f"--gpus {args.gpus} runs at most {args.gpus} configs at once, without --profile")
    runs: dict[str, list] = {n: [] for n in names}
    with GpuBusy() as busy:
        profiles = profile(args, profiled, deadline)
        failed = [n for n in profiled if profiles[n]["rc"] != 0]
        if failed:  # a configuration that cannot run here would only burn the deadline three more times
            names = [n for n in names if n not in failed]
            print(f"profile runs failed: {failed}; timed runs now: {names} (logs in {args.out})", flush=True)
            runs = {n: [] for n in names}
        for index in range(args.repeats):  # interleaved: a b c a b c ...
            for name, r in rounds(args, names, index, deadline, busy):
                runs[name].append(r)
                write_report(args, runs, profiles, started)  # a call cut short keeps what it measured
                print(f"{name} #{index}: " + (f"{r['tokens_per_s']:,.0f} tokens/s, {r['s_per_step']:.3f} s/step, "
                                              f"GPU {r['gpu']} busy {r['gpu_busy'] or 0:.0%}, "
                                              f"warm-up {r['warmup_s']:.0f}s"
                                              if r["tokens_per_s"] else f"failed (rc {r['rc']})"), flush=True)
    summary = write_report(args, runs, profiles, started)
    # One file for every run's log tail: what comes back from the GPU machine is limited to a few files.
    with open(args.out / "train_speed_logs.txt", "w") as out:
        for log in sorted(args.work.glob("*.log")):
            out.write(f"===== {log.name}\n{log.read_text()[-4000:]}\n")
    print(json.dumps(environment()))
    print(table(summary, "recipe" if "recipe" in runs else next(iter(runs))))


if __name__ == "__main__":
    main()

"""Serving speed on llm-jp-3-1.8b's shape: the recipe's generate loop vs `ray-sft serve` at concurrency 1, 8, 32.

One command on the GPU machine runs everything side by side (same model, adapter, prompts, decoding) and prints a
table last; JSON and a log go to --out:

    python bench/gpu/serve_speed.py --out $OUT                       # on the H200
    python bench/gpu/serve_speed.py --out /tmp/o --tiny --device cpu  # CPU dry run of the whole script
    python bench/gpu/serve_speed.py --out $OUT --merged-only --set quantization.compute_dtype=float32  # text check

(a) the loop: `ray_sft.generate` as `ray-sft generate` runs it (4-bit NF4 base + PeftModel, greedy, repetition
    penalty 1.2, 100 new tokens), one request at a time;
(a') `ray-sft generate --merge` on the same adapter, one request at a time: the merged model, which decodes with a
    static KV cache (compiled into CUDA graphs on the GPU); the reference text for the merged server;
(b) the Serve app (`ray_sft.serve.deploy` on a local cluster from `ray_sft.cluster.connect`, one replica with one
    GPU, max_batch_size 32), chat requests from 1, 8, 32 closed-loop clients, with serve.merge=true (static cache,
    batches padded to 1, 2, 4, ..., 32 rows, each size compiled while the replica starts), then in 4-bit.

Random-init model and adapter (no weights can be downloaded there; speed does not depend on the values). The EOS
row of lm_head is zeroed: its logit is then always 0 while the greedy winner's is about +4 (random logits have a
standard deviation near 0.9), so every answer is exactly 100 tokens on both sides without changing the decoding
settings. The adapter's LoRA B matrices are random too (PEFT starts them at zero), so merging changes the weights.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import random
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import REPO, SHAPE, TINY_SHAPE, VOCAB, environment  # noqa: E402

RECIPE_SPEC = REPO / "jobs" / "llm-jp-3-1.8b-dolly-ja.yaml"
NEW_TOKENS = 100
PROMPTS = 64
ADAPTER_NAME = "bench"
EOS_ID = 2
LOOP_REQUESTS = 3


# ---------------------------------------------------------------------------------------------------------------
# Model, tokenizer, adapter, prompts


def setup(work: Path, tiny: bool, device: str, overrides: tuple[str, ...] = ()) -> None:
    import torch
    from peft import get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from ray_sft import modeling, run_files, spec

    # A word-level tokenizer over the model's whole vocabulary: every generated id decodes to one word, so the
    # text comparison between server and loop sees every token.
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = [f"w{i}" for i in range(VOCAB - len(specials))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(work / "model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=3,
                         **(TINY_SHAPE if tiny else SHAPE))
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight[EOS_ID].zero_()  # greedy never picks EOS: see the module docstring
    model.save_pretrained(work / "model")

    # The adapter as `ray-sft train` leaves it: <run>/adapter (PEFT format) beside <run>/spec.yaml.
    job = spec.load(RECIPE_SPEC, [f"model.name_or_path={work / 'model'}", f"output.dir={work / 'runs'}",
                                  "output.name=bench", *overrides])
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all but lm_head
    peft_model = get_peft_model(model, modeling.lora_config(job.lora, targets))
    peft_model.peft_config["default"].base_model_name_or_path = str(work / "model")  # where serve loads the base
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    run_dir = work / "runs" / "bench"
    run_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(run_dir / "adapter")
    run_files.write_spec(run_dir, job)

    # Instructions of dolly-like length (lognormal, median about 25 words), one synthetic word per token.
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(words) for _ in range(min(120, max(5, int(rng.lognormvariate(math.log(25),
                                                                                                0.6))))))
               for _ in range(PROMPTS)]
    (work / "prompts.json").write_text(json.dumps(prompts))


# ---------------------------------------------------------------------------------------------------------------
# Measurements


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def row(tokens: int, wall: float, latencies: list[float], counts: list[int]) -> dict:
    return {"requests": len(latencies), "tokens_per_s": tokens / wall, "p50_s": percentile(latencies, 0.5),
            "p95_s": percentile(latencies, 0.95), "wall_s": wall,
            "answers_not_100_tokens": sum(c != NEW_TOKENS for c in counts)}


def gpu_peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def bench_generate(adapter: Path, prompts: list[str], device: str, merge: bool) -> tuple[dict, list[str]]:
    """`ray-sft generate`'s code path, one request at a time: (a) the recipe's inference cell (4-bit + adapter), or
    (a') with `merge` the merged model, which decodes with a static cache (compiled on the GPU)."""
    import gc

    import torch

    from ray_sft import generate

    started = time.perf_counter()
    loaded = generate.load(adapter, merge=merge, device=device)
    generate.generate(loaded, prompts[-1])  # warm-up (CUDA kernels, allocator, the compile): not timed
    ready = time.perf_counter() - started
    latencies, counts, texts, started = [], [], [], time.perf_counter()
    for prompt in prompts[:LOOP_REQUESTS]:
        t = time.perf_counter()
        done = generate.generate(loaded, prompt)
        latencies.append(time.perf_counter() - t)
        counts.append(done.completion_tokens)
        texts.append(done.text)
    result = {**row(sum(counts), time.perf_counter() - started, latencies, counts), "load_and_warm_up_s": ready,
              "peak_gib": gpu_peak_gib(device),
              "static_cache_len": generate.static_cache_len(loaded.model, loaded.spec)}
    del loaded
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()  # the next phase needs the GPU
        torch.cuda.reset_peak_memory_stats()
    return result, texts


def bench_server(url: str, prompts: list[str], concurrency: int, requests: int) -> tuple[dict, dict[int, str]]:
    """`requests` chat requests from `concurrency` closed-loop clients; texts by prompt index."""
    import httpx

    def one(i: int) -> tuple[int, float, int, str]:
        t = time.perf_counter()
        r = client.post("/v1/chat/completions", json={
            "model": ADAPTER_NAME, "max_tokens": NEW_TOKENS,
            "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]})
        r.raise_for_status()
        body = r.json()
        return i, time.perf_counter() - t, body["usage"]["completion_tokens"], body["choices"][0]["message"]["content"]

    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            done = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - started
    counts = [n for _, _, n, _ in done]
    return row(sum(counts), wall, [t for _, t, _, _ in done], counts), {i: text for i, _, _, text in done}


def gpu_used_gib() -> float | None:
    """Whole-GPU memory in use (the replica is another process): nvidia-smi, if there is one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        return float(out.split()[0]) / 1024
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def serve_phase(url: str, adapter: Path, prompts: list[str], device: str, merge: bool, levels: dict[int, int],
                deadline: float, reference: list[str], log) -> dict:
    """Deploy the app (4-bit or merged), then each concurrency level; stop the app."""
    from ray_sft import generate, serve

    job = generate.run_spec(adapter)
    job.serve.merge = merge
    job.serve.max_batch_size = max(levels)
    job.serve.gpus_per_replica = 1 if device == "cuda" else 0
    job.serve.cpus_per_replica = 4 if device == "cuda" else 1
    started = time.perf_counter()
    serve.deploy(job, generate.base_of(adapter), {ADAPTER_NAME: str(adapter)})
    result = {"deploy_s": time.perf_counter() - started, "levels": {}}
    bench_server(url, prompts[-1:], 1, 1)  # warm-up, not timed
    for concurrency, requests in levels.items():
        if time.monotonic() > deadline:
            log(f"deadline: skipped concurrency {concurrency}")
            break
        measured, texts = bench_server(url, prompts, concurrency, requests)
        measured["same_text"] = [texts.get(i) == reference[i] for i in range(len(reference)) if i in texts]
        result["levels"][str(concurrency)] = measured
        log(f"merge={merge} c{concurrency}: {measured}")
    result["gpu_used_gib"] = gpu_used_gib()
    serve.stop()
    return result


# ---------------------------------------------------------------------------------------------------------------
# Report


def table(report: dict) -> str:
    loop = report.get("loop", {})
    base = loop.get("tokens_per_s")
    lines = ["| setup | requests | tokens/s | p50 s | p95 s | vs loop | same text as reference |",
             "|---|---:|---:|---:|---:|---:|---|"]

    def add(name: str, r: dict) -> None:
        ratio = f"{r['tokens_per_s'] / base:.1f}x" if base else "-"
        same = r.get("same_text")
        same = "-" if same is None else f"{sum(same)}/{len(same)}"
        lines.append(f"| {name} | {r['requests']} | {r['tokens_per_s']:,.1f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} "
                     f"| {ratio} | {same} |")

    if loop:
        add("(a) recipe loop: 4-bit + PeftModel, 1 at a time", loop)
    # generation.static_cache "auto" is on CUDA only: the CPU dry run decodes the merged model eagerly.
    cache = "static cache" if report.get("generate_merged", {}).get("static_cache_len") else "dynamic cache"
    if report.get("generate_merged"):
        add(f"(a') ray-sft generate --merge ({cache}), 1 at a time", report["generate_merged"])
    merged = f"merged ({', '.join(report['overrides'])})" if report.get("overrides") else "merged bf16"
    for mode, label in (("serve_merged", f"{merged}, {cache}"), ("serve_4bit", "4-bit + adapter")):
        for c, r in report.get(mode, {}).get("levels", {}).items():
            add(f"(b) ray-sft serve, {label}, concurrency {c}", r)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/serve_speed"))
    parser.add_argument("--deadline", type=float, default=470, help="seconds for the whole script")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: dry-run the script")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override in the bench run's spec, which generate and the server load the model with "
                             "(e.g. quantization.compute_dtype=float32: their greedy text without bf16's rounding)")
    parser.add_argument("--merged-only", action="store_true", help="skip the 4-bit loop and the 4-bit server")
    args = parser.parse_args()

    started = time.monotonic()
    deadline = started + args.deadline
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "serve_speed_log.txt", "w")

    def log(message: str) -> None:
        line = f"[{time.monotonic() - started:6.1f}s] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    report: dict = {"environment": environment(), "new_tokens": NEW_TOKENS, "overrides": args.set}

    def save() -> None:
        report["wall_s"] = time.monotonic() - started
        (args.out / "serve_speed.json").write_text(json.dumps(report, indent=1))

    adapter = args.work / "runs" / "bench" / "adapter"
    try:
        setup(args.work, args.tiny, args.device, tuple(args.set))
        prompts = json.loads((args.work / "prompts.json").read_text())
        log("setup done")
        if not args.merged_only:
            report["loop"], loop_texts = bench_generate(adapter, prompts, args.device, merge=False)
            log(f"loop: {report['loop']}")
        report["generate_merged"], merged_texts = bench_generate(adapter, prompts, args.device, merge=True)
        log(f"generate --merge: {report['generate_merged']}")
        save()

        from ray_sft import cluster, serve

        with cluster.connect():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            url = serve.start("127.0.0.1", port)
            # The 4-bit server decodes at about the loop's speed per step: fewer requests keep it inside the deadline.
            phases = [("serve_merged", True, {1: 5, 8: 16, 32: 64}, merged_texts)]
            if not args.merged_only:
                phases.append(("serve_4bit", False, {1: 3, 8: 8, 32: 32}, loop_texts))
            for mode, merge, levels, reference in phases:
                if time.monotonic() > deadline - 60:
                    log(f"deadline: skipped {mode}")
                    continue
                report[mode] = serve_phase(url, adapter, prompts, args.device, merge, levels, deadline - 30, reference,
                                           log)
                save()
    except Exception:
        log(traceback.format_exc())
        # The replica's own log says why a deploy failed.
        for path in sorted(Path("/tmp").glob("*/session_latest/logs/serve/replica_*.log")):
            log_file.write(f"===== {path}\n{path.read_text()[-4000:]}\n")
    save()
    base = report.get("loop", {}).get("tokens_per_s")
    c32 = report.get("serve_merged", {}).get("levels", {}).get("32") or {}
    print(json.dumps(report["environment"]))
    print(table(report))
    if base and c32:
        print(f"serve merged c32 / loop: {c32['tokens_per_s'] / base:.1f}x")


if __name__ == "__main__":
    main()

"""Serving speed on llm-jp-3-1.8b's shape: the recipe's generate loop vs `ray-sft serve` (the decode engine).

One command on the GPU machine runs everything in one call (same model, adapters, prompts, decoding), writes
results.json (medians, with min-max under "spread"), serve_speed.json (every repeat) and a log to --out, and prints a
table last:

    python bench/gpu/serve_speed.py --out $OUT --deadline 540        # on the H200, about 340 s
    python bench/gpu/serve_speed.py --out /tmp/o --tiny --device cpu  # CPU dry run of the whole script

Each level below is repeated --repeats times, interleaved, each timing >= 10 requests after a warm-up:
(a) the loop: `ray_sft.generate` as `ray-sft generate` runs it (4-bit NF4 base + PeftModel, greedy, repetition
    penalty 1.2, 100 new tokens), one request at a time;
(b) plain batch of 32: the merged model in this process, 32 requests through `ray_sft.engine`, no HTTP, no Ray;
(c) `ray-sft serve`, merged single adapter, real HTTP on 127.0.0.1: concurrency 1 (p50) and 32 (tokens/s);
(d) a request arriving mid-batch: one client's sequential requests while 31 others keep the merged replica busy;
(e) `ray-sft serve` with 4 adapters on one replica (unmerged, per-row LoRA on the dequantized base), concurrency
    32, requests spread evenly over the adapters.
Both apps run at once on the one GPU (half a GPU each).

Random-init model and adapters (no weights can be downloaded there; speed does not depend on the values). The EOS
row of lm_head is zeroed: its logit is then always 0 while the greedy winner's is about +4 (random logits have a
standard deviation near 0.9), so every answer is exactly 100 tokens without changing the decoding settings. The
adapters' LoRA B matrices are random too (PEFT starts them at zero), so merging changes the weights.
"""


from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import REPO, SHAPE, TINY_SHAPE, VOCAB, environment  # noqa: E402

RECIPE_SPEC = REPO / "jobs" / "llm-jp-3-1.8b-dolly-ja.yaml"
NEW_TOKENS = 100
PROMPTS = 64
EOS_ID = 2
ADAPTERS = 4
TIMED = 10  # requests per timing at least
CONCURRENCY = 32


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
    for index in range(ADAPTERS):
        peft_model = get_peft_model(model, modeling.lora_config(job.lora, targets))
        peft_model.peft_config["default"].base_model_name_or_path = str(work / "model")  # where serve loads it
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.02)
        run_dir = work / "runs" / f"bench{index}"
        run_dir.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(run_dir / "adapter")
        run_files.write_spec(run_dir, job)
        model = peft_model.unload()  # the bare base again, for the next adapter

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


def gpu_used_gib() -> float | None:
    """Whole-GPU memory in use (the replica is another process): nvidia-smi, if there is one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        return float(out.split()[0]) / 1024
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


class Loop:
    """(a) `ray-sft generate`'s code path, one request at a time: the recipe's inference cell."""

    def __init__(self, adapter: Path, device: str):
        from ray_sft import generate

        self.loaded = generate.load(adapter, device=device)

    def __call__(self, prompts: list[str]) -> dict:
        from ray_sft import generate

        latencies, counts, started = [], [], time.perf_counter()
        for prompt in prompts[:TIMED]:
            t = time.perf_counter()
            counts.append(generate.generate(self.loaded, prompt).completion_tokens)
            latencies.append(time.perf_counter() - t)
        return row(sum(counts), time.perf_counter() - started, latencies, counts)


class PlainBatch:
    """(b) the merged model in this process, a batch of 32 through the engine: no HTTP, no Ray."""

    def __init__(self, adapter: Path, device: str):
        from ray_sft import engine, generate

        self.loaded = loaded = generate.load(adapter, merge=True, device=device)
        self.tokenizer, self.settings = loaded.tokenizer, loaded.spec.generation
        self.engine = engine.Engine(loaded.tokenizer, CONCURRENCY, generate.longest_request(loaded.spec))
        started = time.perf_counter()
        self.engine.load(loaded.model, {None: 0})  # on CUDA: the decode step's graphs are captured here
        self.load_s = time.perf_counter() - started

    def requests(self, prompts: list[str]) -> list:
        from ray_sft import engine

        return [engine.Request(self.tokenizer(p, add_special_tokens=False)["input_ids"], self.settings)
                for p in prompts[:CONCURRENCY]]

    def __call__(self, prompts: list[str]) -> dict:
        requests = self.requests(prompts)
        started = time.perf_counter()
        done = self.engine.complete(requests)
        wall = time.perf_counter() - started
        counts = [c.completion_tokens for c in done]
        return row(sum(counts), wall, [wall] * len(done), counts)

    def same_text_as_eager(self, prompts: list[str]) -> str:
        """The graphed batch's answers against the same engine decoding eagerly (only live rows, exact key count):
        a wrong bucket would change every answer; bf16 rounding only the odd near-tie."""
        from ray_sft import engine

        eager = engine.Engine(self.tokenizer, CONCURRENCY, self.engine.length, static=False)
        eager.load(self.loaded.model, {None: 0})
        graphed, plain = self.engine.complete(self.requests(prompts)), eager.complete(self.requests(prompts))
        return f"{sum(a.text == b.text for a, b in zip(graphed, plain))}/{len(plain)}"


def bench_server(url: str, prompts: list[str], models: list[str], concurrency: int, requests: int) -> dict:
    """`requests` chat requests from `concurrency` closed-loop clients, request i on models[i % len(models)]."""
    import httpx

    def one(i: int) -> tuple[float, int]:
        t = time.perf_counter()
        r = client.post("/v1/chat/completions", json={
            "model": models[i % len(models)], "max_tokens": NEW_TOKENS,
            "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]})
        r.raise_for_status()
        return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            done = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - started
    counts = [n for _, n in done]
    return row(sum(counts), wall, [t for t, _ in done], counts)


def bench_mid_batch(url: str, prompts: list[str], model: str) -> dict:
    """(d) TIMED sequential requests from one client while CONCURRENCY - 1 others keep the replica decoding: each
    arrives while a batch is mid-decode."""
    stop = threading.Event()

    def busy(offset: int) -> None:
        while not stop.is_set():
            bench_server(url, prompts[offset:], [model], 1, 1)

    background = [threading.Thread(target=busy, args=(i,)) for i in range(1, CONCURRENCY)]
    for thread in background:
        thread.start()
    try:
        time.sleep(1)  # the others are decoding
        return bench_server(url, prompts, [model], 1, TIMED)
    finally:
        stop.set()
        for thread in background:
            thread.join()


def deploy(url: str, adapters: dict[str, Path], device: str, name: str) -> str:
    """An app on route /<name>; returns its base URL."""
    from ray_sft import generate, serve

    job = generate.run_spec(next(iter(adapters.values())))
    job.serve.merge = len(adapters) == 1
    job.serve.max_batch_size = CONCURRENCY
    job.serve.max_adapters_per_replica = len(adapters)
    job.serve.gpus_per_replica = 0.5 if device == "cuda" else 0  # both apps on one GPU
    job.serve.dequantize_base = device == "cuda"
    job.serve.cpus_per_replica = 4 if device == "cuda" else 0.5
    base = generate.base_of(next(iter(adapters.values())))
    serve.deploy(job, base, {n: str(p) for n, p in adapters.items()}, name=name, route_prefix=f"/{name}")
    bench_server(f"{url}/{name}", ["warm up"], list(adapters), 1, 1)  # not timed
    return f"{url}/{name}"


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def results(report: dict) -> dict:
    """results.json: the medians the issue asks for (ratios are taken within each repeat, then the median)."""
    reps = report["repeats"]
    pick = lambda key, field: [r[key][field] for r in reps if key in r]  # noqa: E731
    c32, plain, multi = pick("merged_c32", "tokens_per_s"), pick("plain_batch32", "tokens_per_s"), pick(
        "multi4_c32", "tokens_per_s")
    out = {}
    if pick("merged_c1", "p50_s"):
        out["serve_c1_p50_s"] = summary(pick("merged_c1", "p50_s"))
    if c32:
        out["serve_c32_tokens_per_s"] = summary(c32)
    if pick("mid_batch", "p50_s"):
        out["serve_mid_batch_p50_s"] = summary(pick("mid_batch", "p50_s"))
    if plain:
        out["plain_batch32_tokens_per_s"] = summary(plain)
    if c32 and plain:
        out["serve_c32_over_plain_batch32"] = summary([a / b for a, b in zip(c32, plain)])
    if c32 and multi:
        out["serve_multi4_c32_tokens_per_s"] = summary(multi)
        out["serve_multi4_c32_over_merged"] = summary([a / b for a, b in zip(multi, c32)])
    loop = pick("loop", "tokens_per_s")
    if loop:
        out["loop_tokens_per_s"] = summary(loop)
    if c32 and loop:
        out["serve_c32_over_loop"] = summary([a / b for a, b in zip(c32, loop)])
    return out


def table(report: dict, medians: dict) -> str:
    lines = ["| measure | median | min-max | repeats |", "|---|---:|---:|---:|"]
    for key, value in medians.items():
        lines.append(f"| {key} | {value['median']:,.3f} | {value['min']:,.3f}-{value['max']:,.3f} | {value['n']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/serve_speed"))
    parser.add_argument("--deadline", type=float, default=500, help="seconds for the whole script")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: dry-run the script")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override in the bench run's spec, which generate and the server load the model with")
    args = parser.parse_args()
    if args.tiny:  # the dry run checks the script end to end on 2 CPU cores, not speed
        global TIMED, CONCURRENCY
        TIMED, CONCURRENCY = 2, 4

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

    report: dict = {"environment": environment(), "new_tokens": NEW_TOKENS, "overrides": args.set, "repeats": []}

    def save() -> dict:
        report["wall_s"] = time.monotonic() - started
        (args.out / "serve_speed.json").write_text(json.dumps(report, indent=1))
        medians = results(report)
        (args.out / "results.json").write_text(json.dumps(
            {k: v["median"] for k, v in medians.items()} | {"spread": medians}, indent=1))
        return medians

    adapters = {f"bench{i}": args.work / "runs" / f"bench{i}" / "adapter" for i in range(ADAPTERS)}
    first = next(iter(adapters))
    try:
        setup(args.work, args.tiny, args.device, tuple(args.set))
        prompts = json.loads((args.work / "prompts.json").read_text())
        log("setup done")
        loop = Loop(adapters[first], args.device)
        loop(prompts[-1:])  # warm-up
        log("loop ready")
        plain = PlainBatch(adapters[first], args.device)
        plain(prompts)  # warm-up
        report["engine_load_s"], report["graphed_same_text_as_eager"] = plain.load_s, plain.same_text_as_eager(prompts)
        log(f"plain batch ready: engine load (graph capture) {plain.load_s:.1f}s, same text as eager "
            f"{report['graphed_same_text_as_eager']}")
        save()

        from ray_sft import cluster, serve
        from ray_sft.spec import ServeSpec

        with cluster.connect():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            url = serve.start("127.0.0.1", port, ServeSpec().request_timeout_s)
            merged = deploy(url, {first: adapters[first]}, args.device, "merged")
            log("merged app ready")
            multi = deploy(url, adapters, args.device, "multi")
            log("4-adapter app ready")
            levels = {
                "loop": lambda: loop(prompts),
                "plain_batch32": lambda: plain(prompts),
                "merged_c1": lambda: bench_server(merged, prompts, [first], 1, TIMED),
                "merged_c32": lambda: bench_server(merged, prompts, [first], CONCURRENCY, 2 * CONCURRENCY),
                "mid_batch": lambda: bench_mid_batch(merged, prompts, first),
                "multi4_c32": lambda: bench_server(multi, prompts, list(adapters), CONCURRENCY, 2 * CONCURRENCY),
            }
            for repeat in range(args.repeats):
                report["repeats"].append({})
                for name, measure in levels.items():
                    if time.monotonic() > deadline - 20:
                        log(f"deadline: skipped {name} of repeat {repeat}")
                        continue
                    report["repeats"][-1][name] = measure()
                    log(f"repeat {repeat} {name}: {report['repeats'][-1][name]}")
                save()
            report["gpu_used_gib"] = gpu_used_gib()
            serve.stop("merged")
            serve.stop("multi")
    except Exception:
        log(traceback.format_exc())
        # The replica's own log says why a deploy failed.
        for path in sorted(Path("/tmp").glob("*/session_latest/logs/serve/replica_*.log")):
            log_file.write(f"===== {path}\n{path.read_text()[-4000:]}\n")
    medians = save()
    print(json.dumps(report["environment"]))
    print(table(report, medians))


if __name__ == "__main__":
    main()

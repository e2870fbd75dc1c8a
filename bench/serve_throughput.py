"""Serving throughput: the Serve app at concurrency 1, 8, 32 vs the recipe's one-request-at-a-time generate loop.

Same adapter, same machine, same decoding (greedy, the recipe's repetition penalty, --max-tokens new tokens),
one torch thread on both sides. Prints a markdown table (tokens/s, p50/p95 latency) and the server/loop ratio.

    .venv/bin/python bench/serve_throughput.py --adapter runs/quickstart/adapter
"""

from __future__ import annotations

import argparse
import concurrent.futures
import socket
import time

PROMPTS = ["時間管理能力をあげるには?", "猫について教えてください。", "日本で一番高い山は?", "水の沸点は?",
           "良い睡眠のコツは?", "プログラミングを学ぶ方法は?", "東京の観光地を教えて。", "健康的な朝食とは?"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def row(label: str, tokens: int, wall: float, latencies: list[float]) -> dict:
    return {"label": label, "requests": len(latencies), "tok_s": tokens / wall,
            "p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95)}


def bench_loop(adapter: str, requests: int, max_tokens: int) -> dict:
    from ray_sft import generate

    loaded = generate.load(adapter)
    settings = generate.with_overrides(loaded.spec.generation, max_new_tokens=max_tokens)
    generate.generate(loaded, PROMPTS[0], settings)  # warm-up
    latencies, tokens, started = [], 0, time.perf_counter()
    for i in range(requests):
        t = time.perf_counter()
        tokens += generate.generate(loaded, PROMPTS[i % len(PROMPTS)], settings).completion_tokens
        latencies.append(time.perf_counter() - t)
    return row("generate loop (1 at a time)", tokens, time.perf_counter() - started, latencies)


def bench_server(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    import httpx

    def one(i: int) -> tuple[float, int]:
        t = time.perf_counter()
        r = client.post("/v1/chat/completions", json={
            "model": "bench", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]})
        r.raise_for_status()
        return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        one(0)  # warm-up
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            done = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - started
    return row(f"server, concurrency {concurrency}", sum(n for _, n in done), wall, [t for t, _ in done])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--requests", type=int, default=64, help="requests per measurement")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()

    import torch

    from ray_sft import cluster, generate, serve

    torch.set_num_threads(1)  # the replica gets one thread too (cpus_per_replica: 1)
    rows = [bench_loop(args.adapter, args.requests, args.max_tokens)]
    spec = generate.run_spec(args.adapter)
    spec.serve.max_batch_size = max(args.concurrency)
    with cluster.connect():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = serve.start("127.0.0.1", port, spec.serve.request_timeout_s)
        serve.deploy(spec, generate.base_of(args.adapter), {"bench": args.adapter})
        rows += [bench_server(url, c, args.requests, args.max_tokens) for c in args.concurrency]
        serve.stop()
    print(f"\n{args.requests} requests per row, {args.max_tokens} new tokens each (greedy), "
          f"max_batch_size {spec.serve.max_batch_size}\n")
    print("| setup | requests | tokens/s | p50 latency (s) | p95 latency (s) | tokens/s vs loop |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['requests']} | {r['tok_s']:.1f} | {r['p50']:.3f} | {r['p95']:.3f} | "
              f"{r['tok_s'] / rows[0]['tok_s']:.2f}x |")


if __name__ == "__main__":
    main()

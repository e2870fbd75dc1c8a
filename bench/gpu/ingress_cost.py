"""What a serving code change costs on the hot path, on the GPU: the same merged adapter served by two source trees
at once, measured alternately (a b a b a b) in one call. Written for the ingress deployment of issue 16 (branch
serve-503: HTTP goes to a model-less ingress that forwards to the replicas through a DeploymentHandle, one more hop
per request), whose CPU figures could not say whether the hop costs anything beside a GPU's decode:

    git archive serve-503 | tar -x -C .alt503      # the other tree, carried to the GPU machine
    python3 bench/gpu/ingress_cost.py --out $OUT --trees main=.,ingress=.alt503

Each tree gets its own process, private Ray cluster and Serve instance on its own port (started one after the
other), with the model and adapter
of serve_speed.py (same shape, 100 new tokens per answer), half the GPU each. Both stay up while the driver times
one after the other: concurrency 1 (p50 latency over TIMED requests) and concurrency 32 (tokens/s over 128
requests, after an untimed round), so the host's state drifts over both alike. Ratios are taken within each repeat,
then the median.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_speed  # noqa: E402


def host(work: Path, port: int, ready: Path, device: str) -> None:
    """One tree's server (its ray_sft is the first on PYTHONPATH): up until stdin closes."""
    import ray_sft
    from ray_sft import cluster, serve
    from ray_sft.spec import ServeSpec

    adapters = {"bench0": work / "runs" / "bench0" / "adapter"}
    # Ray puts the driver's working directory first on its workers' path: it must be this tree's root, or the
    # replicas would import the other tree's ray_sft.
    os.chdir(Path(ray_sft.__file__).resolve().parents[1])
    with cluster.connect():
        url = serve.start("127.0.0.1", port, ServeSpec().request_timeout_s)
        merged = serve_speed.deploy(url, adapters, device, "merged")
        modules = sorted(p.stem for p in Path(ray_sft.__file__).parent.glob("*.py"))
        ready.write_text(json.dumps({"url": merged, "ray_sft": ray_sft.__file__, "modules": modules}))
        sys.stdin.read()  # the driver closes it when done
        serve.stop("merged")


def start_host(args, name: str, tree: Path) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = [str(tree.resolve()), *[p for p in os.environ.get("PYTHONPATH", "").split(":")
                                  if p and Path(p).resolve() != Path.cwd().resolve()]]
    return subprocess.Popen(
        [sys.executable, __file__, "--host", name, "--port", str(port), "--work", str(args.work),
         "--device", args.device], stdin=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ":".join(path)},
        stdout=open(args.out / f"host_{name}.log", "w"), stderr=subprocess.STDOUT)


def wait_ready(args, name: str, process: subprocess.Popen, deadline: float) -> dict:
    path = args.work / f"ready_{name}.json"
    while not path.is_file():
        if process.poll() is not None:
            raise RuntimeError(f"{name} server exited ({process.returncode}): see host_{name}.log")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} server not ready")
        time.sleep(1)
    return json.loads(path.read_text())


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/ingress_cost"))
    parser.add_argument("--trees", default="main=.,ingress=.alt503", help="name=path,...; the first is the base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=540)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: dry-run the script")
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work.resolve()
    if args.tiny:
        serve_speed.TIMED, serve_speed.CONCURRENCY = 2, 4
    if args.host:
        return host(args.work, args.port, args.work / f"ready_{args.host}.json", args.device)

    started = time.monotonic()
    deadline = started + args.deadline
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    for stale in args.work.glob("ready_*.json"):  # a server is ready when its file appears
        stale.unlink()
    trees = {name: Path(path) for name, path in (t.split("=", 1) for t in args.trees.split(","))}
    serve_speed.setup(args.work, args.tiny, args.device)
    prompts = json.loads((args.work / "prompts.json").read_text())
    processes: dict[str, subprocess.Popen] = {}
    report: dict = {"trees": {}, "repeats": []}
    try:
        # One after the other: two clusters starting at once can starve Serve's proxy health check.
        for name, tree in trees.items():
            processes[name] = start_host(args, name, tree)
            report["trees"][name] = wait_ready(args, name, processes[name], deadline - 60)
        ready = report["trees"]
        print(f"[{time.monotonic() - started:.0f}s] servers ready: {json.dumps(ready)}", flush=True)
        c, timed = serve_speed.CONCURRENCY, serve_speed.TIMED
        # Untimed: the first batches capture the decode graphs (stop 26's first repeat ran at half speed on both).
        for info in ready.values():
            serve_speed.bench_server(info["url"], prompts, ["bench0"], c, 2 * c)
        for repeat in range(args.repeats):
            found = {}
            for name, info in ready.items():  # a b a b ...
                if time.monotonic() > deadline - 30:
                    break
                found[name] = {"c1": serve_speed.bench_server(info["url"], prompts, ["bench0"], 1, timed),
                               f"c{c}": serve_speed.bench_server(info["url"], prompts, ["bench0"], c, 4 * c)}
                print(f"[{time.monotonic() - started:.0f}s] repeat {repeat} {name}: "
                      f"c1 p50 {found[name]['c1']['p50_s']:.3f}s, "
                      f"c{c} {found[name][f'c{c}']['tokens_per_s']:,.0f} tokens/s", flush=True)
            report["repeats"].append(found)
    finally:
        for process in processes.values():
            process.stdin.close()
        for process in processes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    base = next(iter(trees))
    whole = [r for r in report["repeats"] if len(r) == len(trees)]
    summary = {}
    for name in trees:
        summary[name] = {"c1_p50_s": spread([r[name]["c1"]["p50_s"] for r in whole]),
                         f"c{c}_tokens_per_s": spread([r[name][f"c{c}"]["tokens_per_s"] for r in whole])}
        if name != base:
            summary[name][f"c{c}_over_{base}"] = spread(
                [r[name][f"c{c}"]["tokens_per_s"] / r[base][f"c{c}"]["tokens_per_s"] for r in whole])
            summary[name][f"c1_p50_over_{base}"] = spread(
                [r[name]["c1"]["p50_s"] / r[base]["c1"]["p50_s"] for r in whole])
    report |= {"summary": summary, "environment": serve_speed.environment(), "wall_s": time.monotonic() - started}
    (args.out / "ingress_cost.json").write_text(json.dumps(report, indent=1))
    print("| tree | measure | median | min-max | repeats |\n|---|---|---:|---:|---:|")
    for name, measures in summary.items():
        for key, v in measures.items():
            print(f"| {name} | {key} | {v['median']:,.3f} | {v['min']:,.3f}-{v['max']:,.3f} | {v['n']} |")


if __name__ == "__main__":
    main()

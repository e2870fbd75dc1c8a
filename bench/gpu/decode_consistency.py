"""Why does the merged server's greedy text differ from `ray-sft generate --merge` on the GPU?

    python bench/gpu/decode_consistency.py --out $OUT [--deadline 540]
    python bench/gpu/decode_consistency.py --out /tmp/o --tiny --device cpu --variants bf16   # CPU dry run

The serve bench's model and adapter (serve_speed.setup), merged as `ray-sft generate --merge` and the merged server
load them. Each variant runs in its own process and decodes through `generate.complete` (the code path of both)
while recording every step's processed scores (after the repetition penalty: the values greedy takes the argmax
of). Calls, in order: prompt 0 three times at batch 1, prompts 1 and 2 at batch 1, prompts 0-2 as one batch padded
to 4 rows (as the server pads), prompt 0 at batch 1 again.

For each comparison with the first call of that prompt it reports the first step whose token differs, the largest
score difference over the steps before it (same tokens so far, so the same inputs), and the reference's margin
between its top two scores at the divergent step. A difference is then either a near tie flipped by rounding
(margin about the size of the score difference) or a real change (margin much larger).

Variants:
  bf16           as served: bf16, static cache, transformers' compiled decode step (CUDA graphs);
  bf16_eager     the same static cache without compiling (generation_config.disable_compile);
  bf16_inductor  compiled, without CUDA graphs (CompileConfig mode "default");
  bf16_cublas    compiled with CUDA graphs, CUBLAS_WORKSPACE_CONFIG=:4096:8 and no reduced-precision bf16 GEMM
                 reductions;
  fp32           the merged model cast to float32, TF32 off, compiled with CUDA graphs;
  bf16_eager_det         bf16_eager under torch.use_deterministic_algorithms and CUBLAS_WORKSPACE_CONFIG=:4096:8;
  bf16_eager_eager_attn  bf16_eager with transformers' plain ("eager") attention in place of sdpa.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_speed  # noqa: E402  (one folder of scripts, not a package)

VARIANTS = ["bf16", "bf16_eager", "bf16_inductor", "bf16_cublas", "fp32", "bf16_eager_det", "bf16_eager_eager_attn"]
ENV = {"bf16_cublas": {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}, "bf16_eager_det": {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}}
CALLS = [("p0#1", [0], 1), ("p0#2", [0], 1), ("p0#3", [0], 1), ("p1", [1], 1), ("p2", [2], 1),
         ("batch4", [0, 1, 2], 4), ("p0#4", [0], 1)]


def compare(reference, other) -> dict:
    """First differing token, max score difference before it, and the reference's top-2 margin there."""
    ref_tokens, ref_scores = reference
    tokens, scores = other
    steps = min(len(ref_tokens), len(tokens))
    diverge = next((i for i in range(steps) if ref_tokens[i] != tokens[i]), None)
    upto = steps if diverge is None else diverge + 1  # the divergent step's inputs are still shared
    delta = (ref_scores[:upto] - scores[:upto]).abs().amax(dim=-1)
    result = {"first_divergent_step": diverge, "max_score_diff": float(delta.max()),
              "score_diff_step0": float(delta[0])}
    if diverge is not None:
        top2 = ref_scores[diverge].topk(2).values
        result["ref_margin_at_divergence"] = float(top2[0] - top2[1])
        result["score_diff_at_divergence"] = float(delta[diverge])
    return result


def margins(scores) -> dict:
    """How close greedy's choices are: the top-1 minus top-2 score at each step of one answer."""
    top2 = scores.topk(2, dim=-1).values
    gap = (top2[:, 0] - top2[:, 1]).sort().values
    return {"median": float(gap[len(gap) // 2]), "min": float(gap[0]),
            "share_below_0.01": float((gap < 0.01).float().mean()),
            "share_below_0.05": float((gap < 0.05).float().mean())}


def run_variant(variant: str, work: Path, device: str) -> dict:
    import torch
    from transformers import CompileConfig

    from ray_sft import generate

    if variant == "bf16_cublas":
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    prompts = json.loads((work / "prompts.json").read_text())[:3]
    loaded = generate.load(work / "runs" / "bench" / "adapter", merge=True, device=device)
    model = loaded.model
    if variant == "fp32":
        model.float()
    if variant.startswith("bf16_eager"):
        model.generation_config.disable_compile = True
    if variant == "bf16_eager_det":
        torch.use_deterministic_algorithms(True, warn_only=True)
    if variant == "bf16_eager_eager_attn":
        model.set_attn_implementation("eager")
    if variant == "bf16_inductor":
        model.generation_config.compile_config = CompileConfig(mode="default")
    cache_len = generate.static_cache_len(model, loaded.spec)

    recorded = []
    plain_generate = model.generate

    def recording_generate(**kwargs):  # complete() unchanged; only the scores are kept on the side
        output = plain_generate(**kwargs, output_scores=True, return_dict_in_generate=True)
        recorded.append(torch.stack(output.scores, dim=1).float().cpu())
        return output.sequences

    model.generate = recording_generate
    rendered = [generate.prompt_for(p, loaded.spec) for p in prompts]
    outputs, seconds = {}, {}
    for name, indices, rows in CALLS:
        started = time.monotonic()
        texts = generate.complete(model, loaded.tokenizer, [rendered[i] for i in indices], loaded.spec.generation,
                                  rows=rows, cache_len=cache_len)
        seconds[name] = round(time.monotonic() - started, 2)
        scores = recorded.pop()
        for row, i in enumerate(indices):
            ids = loaded.tokenizer(texts[row].text, add_special_tokens=False)["input_ids"]
            outputs[(name, i)] = (ids, scores[row, : len(ids)])

    first = {0: outputs[("p0#1", 0)], 1: outputs[("p1", 1)], 2: outputs[("p2", 2)]}
    comparisons = {f"{name}[{i}] vs first": compare(first[i], outputs[(name, i)])
                   for name, indices, _ in CALLS for i in indices if outputs[(name, i)] is not first[i]}
    return {"variant": variant, "cache_len": cache_len, "dtype": str(model.dtype), "seconds": seconds,
            "margins_p0": margins(first[0][1]), "comparisons": comparisons}


def table(results: list[dict]) -> str:
    lines = ["| variant | comparison | first divergent step | ref margin there | max score diff before |",
             "|---|---|---:|---:|---:|"]
    for result in results:
        for name, c in result["comparisons"].items():
            step = "-" if c["first_divergent_step"] is None else c["first_divergent_step"]
            margin = f"{c['ref_margin_at_divergence']:.4f}" if "ref_margin_at_divergence" in c else "-"
            lines.append(f"| {result['variant']} | {name} | {step} | {margin} | {c['max_score_diff']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/decode_consistency"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--deadline", type=float, default=540, help="seconds for the whole script")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        result = run_variant(args.variant, args.work, args.device)
        (args.out / f"decode_{args.variant}.json").write_text(json.dumps(result, indent=1))
        return

    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    serve_speed.setup(args.work, args.tiny, args.device)
    results = []
    for variant in args.variants.split(","):
        left = args.deadline - (time.monotonic() - started)
        if left < 60:
            print(f"skipped {variant}: {left:.0f} s left", flush=True)
            continue
        command = [sys.executable, __file__, "--variant", variant, "--out", str(args.out), "--work", str(args.work),
                   "--device", args.device]
        try:
            subprocess.run(command, env=os.environ | ENV.get(variant, {}), timeout=left, check=True)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            print(f"{variant} failed: {error}", flush=True)
            continue
        results.append(json.loads((args.out / f"decode_{variant}.json").read_text()))
        print(f"[{time.monotonic() - started:6.1f}s] {variant}: margins {results[-1]['margins_p0']}, "
              f"seconds {results[-1]['seconds']}", flush=True)
    summary = table(results)
    (args.out / "decode_consistency.md").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()

"""Why does the merged server's greedy text differ from `ray-sft generate --merge` at batch 1 on the GPU?

    python bench/gpu/decode_consistency.py --out $OUT [--deadline 150]

One process, the serve bench's model and adapter (serve_speed.setup), the merged model with its static cache. Each
step prints and saves the batch-1 greedy texts of the same three prompts, compared with step A:
A. `generate.generate` as `ray-sft generate --merge` runs it (compiles batch 1);
B. after decoding at 2 and 4 rows as a server replica's warm-up does (the compiled graph goes dynamic in the batch);
C. from another thread, as a replica's model thread runs it;
D. with `CompileConfig(dynamic=False)`: one static graph per batch size, batch 1 before and after a batch of 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_speed  # noqa: E402  (one folder of scripts, not a package)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/decode_consistency"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    started, report = time.monotonic(), {}

    def save(step: str, value) -> None:
        report[step] = value
        report["wall_s"] = time.monotonic() - started
        (args.out / "decode_consistency.json").write_text(json.dumps(report, indent=1))
        print(f"[{report['wall_s']:6.1f}s] {step}: {value if not isinstance(value, list) else '...'}", flush=True)

    from transformers import CompileConfig

    from ray_sft import generate

    serve_speed.setup(args.work, args.tiny, args.device)
    prompts = json.loads((args.work / "prompts.json").read_text())[:3]
    loaded = generate.load(args.work / "runs" / "bench" / "adapter", merge=True, device=args.device)
    save("static_cache_len", generate.static_cache_len(loaded.model, loaded.spec))

    def texts() -> list[str]:
        return [generate.generate(loaded, p).text for p in prompts]

    def rows(n: int) -> None:
        rendered = [generate.prompt_for(p, loaded.spec) for p in prompts[:1]]
        settings = generate.with_overrides(loaded.spec.generation, max_new_tokens=2)
        generate.complete(loaded.model, loaded.tokenizer, rendered, settings, rows=n,
                          cache_len=generate.static_cache_len(loaded.model, loaded.spec))

    reference = texts()
    save("A_generate_batch1", reference)
    save("A_repeat_equal", texts() == reference)
    rows(2)
    rows(4)
    save("B_after_rows_2_4_equal", texts() == reference)
    with ThreadPoolExecutor(1) as pool:
        save("C_other_thread_equal", pool.submit(texts).result() == reference)
    loaded.model.generation_config.compile_config = CompileConfig(dynamic=False)
    static = texts()
    save("D_dynamic_false_batch1_equal", static == reference)
    rows(2)
    save("D_dynamic_false_after_rows_2_equal", texts() == static)


if __name__ == "__main__":
    main()

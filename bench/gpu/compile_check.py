"""Does `training.compile` compute the step the eager layers compute, on CUDA? One batch, gradients compared.

The fast spec's first step (64 packed rows, 4-bit base, LoRA, gradient checkpointing, varlen attention) on the
bench's synthetic model, forward and backward through ray_sft's trainer, once per case:

    python3 bench/gpu/compile_check.py --out $OUT [--autocast]                 # on the H200, about 2 minutes
    python3 bench/gpu/compile_check.py --out /tmp/o --tiny --device cpu --backend aot_eager   # CPU dry run

(1) LoRA dropout off: the compiled layers against the eager ones; eager run twice gives the noise floor (bf16
    and non-deterministic backward kernels).
(2) LoRA dropout 0.05, as the spec has it: with and without gradient checkpointing, each compiled and eager.
    Masks differ between eager and compiled (different generators), but within one mode the recompute in
    backward must draw the forward's masks: checkpointed gradients equal the un-checkpointed ones.
Writes compile_check.json to --out after every case (a deadline cut keeps what was measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import FAST_SPEC, overrides, prepare  # noqa: E402

AUTOCAST = False


def step_gradients(trainer, inputs, seed: int) -> tuple[float, dict]:
    """Loss and LoRA/embedding gradients of one forward and backward pass, the global generator seeded first.

    With `--autocast` the forward runs under bf16 autocast, as the Trainer's (accelerate's) forward does with
    `training.bf16`; without it, as stop 23's call ran it."""
    import torch

    model = trainer.model
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=AUTOCAST):
        loss = trainer.compute_loss(model, inputs)
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def distance(a: dict, b: dict) -> dict:
    """Worst and overall relative L2 difference of two gradient sets."""
    import torch

    worst = max((torch.linalg.vector_norm(a[n] - b[n]) / torch.linalg.vector_norm(b[n]).clamp_min(1e-30)).item()
                for n in b)
    total = torch.sqrt(sum(torch.linalg.vector_norm(a[n] - b[n]) ** 2 for n in b))
    scale = torch.sqrt(sum(torch.linalg.vector_norm(b[n]) ** 2 for n in b))
    return {"worst_param_rel": worst, "all_rel": (total / scale).item(), "params": len(b),
            "same_params": sorted(a) == sorted(b)}


def set_dropout(model, p: float) -> None:
    import torch

    for name, module in model.named_modules():
        if "lora_dropout" in name and isinstance(module, torch.nn.Dropout):
            module.p = p


def set_compiled(layers, compiled: bool, backend: str) -> None:
    for layer in layers:
        if compiled:
            layer.compile(backend=backend, dynamic=True)
        else:
            layer._compiled_call_impl = None  # back to the eager forward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/train_speed"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: dry-run the script")
    parser.add_argument("--autocast", action="store_true", help="forward under bf16 autocast, as the Trainer's")
    args = parser.parse_args()
    global AUTOCAST
    AUTOCAST = args.autocast
    started = time.monotonic()
    prepare(args)

    from transformers.modeling_layers import GradientCheckpointingLayer

    from ray_sft import data, modeling, spec, train

    extra = ["lora.dropout=0.05", "training.compile=false"] + (
        ["model.attn_implementation=sdpa"] if args.device == "cpu" else [])
    job = spec.load(FAST_SPEC, overrides(args.work, 1, "compile-check", args.device) + extra)
    tokenizer = modeling.load_tokenizer(str(args.work / "model"), job.model)
    rows = data.load_examples(job, tokenizer).train
    trainer = train.build_trainer(job, str(args.work / "model"), tokenizer, rows, [], args.device,
                                  str(args.work / "runs" / "compile-check"))
    trainer.model.train()
    batches = iter(trainer.get_train_dataloader())
    inputs, later = (trainer._prepare_inputs(next(batches)) for _ in range(2))
    layers = [m for m in trainer.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    report: dict = {"tokens": int(inputs["input_ids"].numel()), "backend": args.backend,
                    "autocast": args.autocast, "cases": {}}

    def record(name: str, value) -> None:
        report["cases"][name] = value
        report["wall_s"] = time.monotonic() - started
        (args.out / "compile_check.json").write_text(json.dumps(report, indent=1))
        print(f"[{report['wall_s']:6.1f}s] {name}: {value}", flush=True)

    set_dropout(trainer.model, 0.0)
    later_loss, later_eager = step_gradients(trainer, later, 0)
    eager_loss, eager = step_gradients(trainer, inputs, 0)
    again_loss, again = step_gradients(trainer, inputs, 0)
    record("no_dropout_eager_vs_eager", {"losses": [eager_loss, again_loss], **distance(again, eager)})
    set_compiled(layers, True, args.backend)
    t = time.monotonic()
    compiled_loss, compiled = step_gradients(trainer, inputs, 0)
    first_s = time.monotonic() - t
    record("no_dropout_compiled_vs_eager", {"losses": [compiled_loss, eager_loss], "first_pass_s": first_s,
                                            **distance(compiled, eager)})
    # A graph compiled on the first batch, run on the second (other lengths, other row boundaries).
    compiled_later_loss, compiled_later = step_gradients(trainer, later, 0)
    record("no_dropout_second_batch_compiled_vs_eager", {"losses": [compiled_later_loss, later_loss],
                                                         **distance(compiled_later, later_eager)})

    set_dropout(trainer.model, 0.05)
    for compiled_mode in (True, False):
        set_compiled(layers, compiled_mode, args.backend)
        ckpt_loss, ckpt = step_gradients(trainer, inputs, 1)
        trainer.model.gradient_checkpointing_disable()
        plain_loss, plain = step_gradients(trainer, inputs, 1)
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        name = "compiled" if compiled_mode else "eager"
        record(f"dropout_{name}_checkpointed_vs_not", {"losses": [ckpt_loss, plain_loss], **distance(ckpt, plain)})


if __name__ == "__main__":
    main()

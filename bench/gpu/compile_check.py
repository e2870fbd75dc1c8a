"""Does `training.compile` compute the step the eager layers compute, on CUDA? Losses and gradients compared.

The fast spec's first four steps' batches (64 packed rows, its base: dequantized since stop 31, 4-bit before; LoRA,
gradient checkpointing, varlen attention) on the bench's synthetic model, forward and backward through ray_sft's
trainer, once per case:

    python3 bench/gpu/compile_check.py --out $OUT [--autocast]                 # on the H200, about 2 minutes
    python3 bench/gpu/compile_check.py --out /tmp/o --tiny --device cpu --backend aot_eager   # CPU dry run
    python3 bench/gpu/compile_check.py --out $OUT --dropout-only --traced-checkpoint

(1) LoRA dropout off: the compiled layers against the eager ones, at the same weights, on each of the four
    batches; eager run twice gives the noise floor (bf16 and non-deterministic backward kernels).
(2) LoRA dropout 0.05, as the spec has it: with and without gradient checkpointing, each compiled and eager.
    Masks differ between eager and compiled (different generators), but within one mode the recompute in
    backward must draw the forward's masks: checkpointed gradients equal the un-checkpointed ones.
(3) Which bf16 step is nearer the truth: both against an fp32 reference (the same 4-bit codes dequantized to fp32,
    the same LoRA and embedding values, no autocast), overall and per parameter group; and the compiled layers
    with inductor's emulate_precision_casts (intermediates rounded to bf16 where eager rounds them).
(4) Whether each model sees a first, Adam-sized update: one sign step of lr size on the fp32 model, the eager bf16
    layers and the compiled ones, and each one's loss change on every batch.
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


def step_gradients(trainer, inputs, seed: int, autocast: bool | None = None) -> tuple[float, dict]:
    """Loss and LoRA/embedding gradients of one forward and backward pass, the global generator seeded first.

    With `--autocast` the forward runs under bf16 autocast, as the Trainer's (accelerate's) forward does with
    `training.bf16`; without it, as stop 23's call ran it."""
    import torch

    model = trainer.model
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=AUTOCAST if autocast is None else autocast):
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


GROUPS = ("embed_tokens", "lora_A", "lora_B")


def by_group(a: dict, b: dict) -> dict:
    """Relative L2 difference per parameter group (the embedding copy, every lora_A, every lora_B)."""
    import torch

    found = {}
    for group in GROUPS:
        names = [n for n in b if group in n]
        if names:
            diff = torch.sqrt(sum(torch.linalg.vector_norm(a[n] - b[n]) ** 2 for n in names))
            scale = torch.sqrt(sum(torch.linalg.vector_norm(b[n]) ** 2 for n in names))
            # None where the reference is all zero (lora_A while every lora_B is still 0): nothing to be relative to
            found[group] = (diff / scale).item() if scale > 0 else None
    return found


def against(reference: dict, **runs: dict) -> dict:
    return {name: {**distance(grads, reference), "groups": by_group(grads, reference)} for name, grads in runs.items()}


def fp32_trainer(args, trainer, rows, tokenizer, extra):
    """The same step in fp32: compute dtype float32, no bf16, trainable values copied from `trainer`."""
    import torch

    from ray_sft import spec, train

    # Flash (varlen) attention has no fp32 kernel: the reference attends with sdpa over the same packed rows.
    job = spec.load(FAST_SPEC, overrides(args.work, 1, "compile-check-fp32", args.device) + extra
                    + ["quantization.compute_dtype=float32", "training.bf16=false", "model.attn_implementation=sdpa"])
    reference = train.build_trainer(job, str(args.work / "model"), tokenizer, rows, [], args.device,
                                    str(args.work / "runs" / "compile-check-fp32"))
    values = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    targets = {n: p for n, p in reference.model.named_parameters() if n in values}
    if targets.keys() != values.keys():
        raise RuntimeError(f"fp32 model lacks trainable parameters: {sorted(values.keys() - targets.keys())[:5]}")
    with torch.no_grad():
        for name, param in targets.items():
            param.copy_(values[name].to(param.dtype))
    reference.model.train()
    set_dropout(reference.model, 0.0)
    return reference


def loss_after_sign_step(reference, grads: dict, eta: float, inputs, autocast: bool = False) -> float:
    """The loss on `inputs` after every parameter moves by -eta * sign(its gradient), then put back.

    Adam's first steps are about that (each element by lr in its gradient's sign, whatever the magnitude), so a
    gradient whose signs are wrong on many small elements lowers the loss less, or raises it. In eval mode: no
    NEFTune noise, so the losses differ only by the step."""
    import torch

    reference.model.eval()
    params = {n: p for n, p in reference.model.named_parameters() if n in grads}
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for name, param in params.items():
            param.sub_(eta * torch.sign(grads[name]).to(param.dtype))
        with torch.autocast(reference.model.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = reference.compute_loss(reference.model, inputs).item()
        for name, param in params.items():
            param.copy_(saved[name])
    reference.model.train()
    return loss


def shape(batch) -> dict:
    """Tokens, rows and longest row of a padding-free batch (rows start where the position ids restart at 0)."""
    positions = batch.get("position_ids")
    rows = (positions[0] == 0).nonzero().flatten().tolist() + [positions.size(-1)] if positions is not None else []
    return {"tokens": int(batch["input_ids"].numel()), "rows": max(len(rows) - 1, 0),
            "longest": max((b - a for a, b in zip(rows, rows[1:])), default=None),
            "max_length_q": int(batch["max_length_q"]) if "max_length_q" in batch else None}


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


def dropout_cases(trainer, layers, inputs, args, record) -> None:
    """(2): with LoRA dropout, a checkpointed step's gradients against the unchecked step's at the same seed, in each
    mode. A recompute that draws new masks differentiates another function than the forward: far apart."""
    import torch._dynamo

    set_dropout(trainer.model, 0.05)
    for compiled_mode in (True, False):
        set_compiled(layers, compiled_mode, args.backend)
        ckpt_loss, ckpt = step_gradients(trainer, inputs, 1)
        trainer.model.gradient_checkpointing_disable()
        plain_loss, plain = step_gradients(trainer, inputs, 1)
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        name = "compiled" if compiled_mode else "eager"
        record(f"dropout_{name}_checkpointed_vs_not", {"losses": [ckpt_loss, plain_loss], **distance(ckpt, plain)})
    if args.traced_checkpoint:
        from train_speed import trace_checkpoints

        torch._dynamo.reset()
        trace_checkpoints(trainer.model)
        set_compiled(layers, True, args.backend)
        ckpt_loss, ckpt = step_gradients(trainer, inputs, 1)
        for layer in layers:
            del layer.forward  # the class's forward; transformers' own checkpointing stays off
        torch._dynamo.reset()
        set_compiled(layers, True, args.backend)
        plain_loss, plain = step_gradients(trainer, inputs, 1)
        record("dropout_compiled_traced_checkpoint_vs_not", {"losses": [ckpt_loss, plain_loss],
                                                            **distance(ckpt, plain)})
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/train_speed"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: dry-run the script")
    parser.add_argument("--autocast", action="store_true", help="forward under bf16 autocast, as the Trainer's")
    parser.add_argument("--dropout-only", action="store_true", help="only (2), the dropout masks' recompute")
    parser.add_argument("--traced-checkpoint", action="store_true",
                        help="(2) also with the checkpoint traced into the compiled layers (train_speed's switch)")
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
    # The first four steps' batches: in the training runs (bench/RESULTS.md, "Compiled layers") the compiled loss
    # left the eager one from step 3 on, most on the steps of short rows (3 and 4, 7 and 8, ...).
    loader = iter(trainer.get_train_dataloader())
    batches = [trainer._prepare_inputs(next(loader)) for _ in range(4)]
    inputs, later = batches[0], batches[1]
    layers = [m for m in trainer.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    report: dict = {"batches": [shape(b) for b in batches], "backend": args.backend, "autocast": args.autocast,
                    "trainable_dtypes": sorted({f"{g}:{p.dtype}" for n, p in trainer.model.named_parameters()
                                                for g in GROUPS if g in n and p.requires_grad}),
                    "cases": {}}

    def record(name: str, value) -> None:
        report["cases"][name] = value
        report["wall_s"] = time.monotonic() - started
        (args.out / "compile_check.json").write_text(json.dumps(report, indent=1))
        print(f"[{report['wall_s']:6.1f}s] {name}: {value}", flush=True)

    if args.dropout_only:
        return dropout_cases(trainer, layers, inputs, args, record)
    set_dropout(trainer.model, 0.0)
    eager_runs = [step_gradients(trainer, batch, 0) for batch in batches]
    eager_loss, eager = eager_runs[0]
    again_loss, again = step_gradients(trainer, inputs, 0)
    record("no_dropout_eager_vs_eager", {"losses": [eager_loss, again_loss], **distance(again, eager),
                                         "groups": by_group(again, eager)})
    set_compiled(layers, True, args.backend)
    t = time.monotonic()
    compiled_loss, compiled = step_gradients(trainer, inputs, 0)
    record("no_dropout_compiled_vs_eager", {"losses": [compiled_loss, eager_loss],
                                            "first_pass_s": time.monotonic() - t,
                                            **distance(compiled, eager), "groups": by_group(compiled, eager)})
    # The graph compiled on the first batch, run on the others (other lengths, more and shorter rows).
    for index in range(1, len(batches)):
        batch_loss, grads = step_gradients(trainer, batches[index], 0)
        record(f"no_dropout_batch{index + 1}_compiled_vs_eager", {
            "losses": [batch_loss, eager_runs[index][0]], **distance(grads, eager_runs[index][1]),
            "groups": by_group(grads, eager_runs[index][1])})
    del eager_runs, grads

    reference = fp32_trainer(args, trainer, rows, tokenizer, extra)
    reference_loss, fp32 = step_gradients(reference, inputs, 0, autocast=False)
    _, fp32_again = step_gradients(reference, inputs, 0, autocast=False)
    record("no_dropout_against_fp32", {"losses": {"fp32": reference_loss, "eager": eager_loss,
                                                  "compiled": compiled_loss},
                                       **against(fp32, eager=eager, eager_again=again, compiled=compiled,
                                                 fp32_again=fp32_again)})
    before = {"same_batch": loss_after_sign_step(reference, fp32, 0.0, inputs),
              "next_batch": loss_after_sign_step(reference, fp32, 0.0, later)}
    for eta in (2e-6, 1e-5):
        record(f"fp32_loss_after_sign_step_{eta:g}", {
            batch: {"before": before[batch], **{name: loss_after_sign_step(reference, grads, eta, batch_inputs)
                                                for name, grads in (("fp32", fp32), ("eager", eager),
                                                                    ("eager_again", again), ("compiled", compiled))}}
            for batch, batch_inputs in (("same_batch", inputs), ("next_batch", later))})
    # Does each model see a first Adam-sized update at all? The same step (fp32 gradient's signs, lr-sized) on the
    # fp32 model, the eager bf16 layers and the compiled ones, each one's loss change on every batch. bf16 keeps
    # about 3 significant digits, so an update 1e-4 the size of a weight can vanish where a sum is rounded.
    models = {"fp32": (reference, False, None), "eager": (trainer, AUTOCAST, False),
              "compiled": (trainer, AUTOCAST, True)}
    for eta in (2e-6, 2e-5):
        changes = {}
        for name, (model, autocast, compiled_mode) in models.items():
            if compiled_mode is not None:
                set_compiled(layers, compiled_mode, args.backend)
            changes[name] = [[loss_after_sign_step(model, fp32, step, batch, autocast) for step in (0.0, eta)]
                             for batch in batches]
        record(f"update_visibility_{eta:g}", {
            name: {"before_after": pairs, "change": [after - before for before, after in pairs]}
            for name, pairs in changes.items()})
    del reference

    dropout_cases(trainer, layers, inputs, args, record)

    if args.backend == "inductor":
        import torch._dynamo
        import torch._inductor.config

        set_dropout(trainer.model, 0.0)
        torch._inductor.config.emulate_precision_casts = True
        torch._dynamo.reset()
        set_compiled(layers, True, args.backend)
        emulated_loss, emulated = step_gradients(trainer, inputs, 0)
        record("no_dropout_compiled_emulating_bf16_casts", {
            "loss": emulated_loss, "vs_eager": {**distance(emulated, eager), "groups": by_group(emulated, eager)},
            "vs_fp32": {**distance(emulated, fp32), "groups": by_group(emulated, fp32)}})


if __name__ == "__main__":
    main()

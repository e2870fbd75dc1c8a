"""How an optimizer step is executed, without changing what it computes.

The recipe's step is per_device_batch_size x gradient_accumulation_steps rows; ray_sft may run it as fewer, larger
forward passes (`training.micro_batch_size`) and padding-free. These helpers keep the recipe's semantics when it
does: the same rows per step, rows cut at max_length, and NEFTune noise at the recipe's per-batch scale.
"""

from __future__ import annotations

from ray_sft.spec import JobSpec


def micro_batching(spec: JobSpec) -> tuple[int, int]:
    """(rows per forward pass, forward passes per optimizer step): the spec's step, executed as it asks."""
    t = spec.training
    rows_per_step = t.per_device_batch_size * t.gradient_accumulation_steps
    micro = t.micro_batch_size or rows_per_step
    return micro, rows_per_step // micro


# Optimizer steps after which the compile pays back on the H200 (the recipe's own job is 47 steps). With bitsandbytes'
# 4-bit layers it costs 55-75 s per process and saves about 0.16 s per fast-spec step: about 400 (bench/RESULTS.md,
# "Stop 25"). On dense weights (the dequantized base; an unquantized one computes alike) it adds 32-47 s to a
# process's warm-up and saves about 0.2 s a step: about 250 ("Stop 30", eager and compiled in one call).
COMPILE_PAYS_AFTER_STEPS = {"4-bit": 400, "dense": 250}


def compile_wanted(setting: bool | str, device_type: str, steps: int, four_bit_layers: bool) -> bool:
    """training.compile resolved for a run of `steps` optimizer steps: "auto" compiles on CUDA when it pays."""
    if setting == "auto":
        return device_type == "cuda" and steps >= COMPILE_PAYS_AFTER_STEPS["4-bit" if four_bit_layers else "dense"]
    return bool(setting)


def compile_layers(model, backend: str = "inductor") -> int:
    """torch.compile every decoder layer in place and return how many were compiled.

    Compiling layer by layer (not the whole model) keeps the graph small: all layers run the same code, so they
    share one compiled graph, and the parts outside them (embeddings with NEFTune's hook, the LM head and loss)
    stay as they are. A packed step's length changes every step, so the graph is compiled once with dynamic sizes
    (the weights' shapes stay static) instead of once per length. A checkpointed layer is checkpointed around its
    compiled call (checkpoint_around_compiled_call).
    """
    import torch._inductor.config
    from transformers.modeling_layers import GradientCheckpointingLayer

    # Inductor keeps a fused kernel's bf16 intermediates in fp32 where eager rounds each op's result to bf16. One
    # step's gradients barely differ, but Adam's per-element normalisation amplifies it: the H200 loss curve then
    # parted from eager's by 3x the recipe's seed-to-seed spread. Rounding where eager rounds, it follows eager's
    # to 0.0007 with the same random numbers (bench/RESULTS.md, "Stop 26"). A renamed option raises here.
    torch._inductor.config.emulate_precision_casts = True
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
        if layer.gradient_checkpointing:
            checkpoint_around_compiled_call(layer)
    return len(layers)


def checkpoint_around_compiled_call(layer) -> None:
    """Checkpoint a compiled layer around its compiled call, whichever way transformers checkpoints it.

    transformers 5.17 checkpoints around the layer's call: the backward runs the compiled graph again under torch's
    checkpointing, which restores the random generator first, so the recompute draws the forward's dropout masks.
    The H200 figures measure that. 5.24 checkpoints inside the layer's forward instead, which Dynamo then traces
    into the graph, and on the H200's torch 2.11 inductor's partitioner failed on such a graph (bench/RESULTS.md,
    "Stop 30"). So the layer's own checkpointing is turned off and torch's wraps the compiled call on either one.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    from ray_sft.couplings import require

    compiled = require("torch", layer, "_compiled_call_impl")
    layer.gradient_checkpointing = False

    def checkpointed_call(*args, **kwargs):
        if layer.training and torch.is_grad_enabled():
            return checkpoint(compiled, *args, use_reentrant=False, **kwargs)
        return compiled(*args, **kwargs)

    layer._compiled_call_impl = checkpointed_call


def compile_seconds() -> float:
    """Seconds torch.compile has spent in this process so far (tracing, AOTAutograd, code generation): the part of
    the first steps' time that is compiling, reported apart from the steps' own speed."""
    import torch._dynamo.utils

    from ray_sft.couplings import drift, require

    names, values = require("torch", torch._dynamo.utils, "compile_times", ("repr", "aggregate"))(
        repr="csv", aggregate=True)
    if not names:
        return 0.0
    if "_compile.compile_inner" not in names:
        raise drift("torch", "torch._dynamo.utils.compile_times no longer reports _compile.compile_inner")
    return float(values[names.index("_compile.compile_inner")])


def truncate_rows(dataset, max_length: int):
    """Keep each tokenized row's first max_length tokens, as TRL's own truncation does without padding_free."""
    return dataset.map(lambda row: {"input_ids": row["input_ids"][:max_length], "labels": row["labels"][:max_length]})


class RecipeNeftune:
    """NEFTune noise at the recipe's scale whatever the micro-batch shape.

    TRL (transformers' neftune_post_forward_hook) draws uniform noise of magnitude alpha / sqrt(L * d), with L the
    padded length of the batch: in the recipe, the longest row of each group of `group_rows` consecutive rows
    (per_device_batch_size). Here every token gets the L of its own row's group, read from the attention mask
    (padded rows) or from the position ids (padding-free rows, one sequence per position-id run from 0).
    """

    def __init__(self, alpha: float, group_rows: int):
        self.alpha, self.group_rows = alpha, group_rows
        self.batch: dict = {}

    def attach(self, model) -> None:
        from peft import PeftModel

        base = model.base_model.model if isinstance(model, PeftModel) else model
        model.register_forward_pre_hook(self._remember_batch, with_kwargs=True)
        base.get_input_embeddings().register_forward_hook(self._add_noise)

    def _remember_batch(self, module, args, kwargs):
        self.batch = {k: kwargs.get(k) for k in ("attention_mask", "position_ids")}

    def _add_noise(self, module, inputs, output):
        import torch

        if not module.training:
            return output
        return output + (torch.rand_like(output) * 2 - 1) * self.magnitude(output).to(output.dtype)

    def magnitude(self, embeddings):
        """alpha / sqrt(L * d) per token, broadcastable to `embeddings` (batch, tokens, d)."""
        import torch

        mask, positions = self.batch.get("attention_mask"), self.batch.get("position_ids")
        if mask is not None:  # padded rows: a row's length is its mask's sum
            lengths = mask.sum(-1)
            group_of_row = torch.arange(lengths.numel(), device=lengths.device) // self.group_rows
            group_length = _group_max(lengths, group_of_row)[group_of_row][:, None]
        elif positions is not None and embeddings.size(0) == 1:  # padding-free: rows start where positions are 0
            starts = positions[0] == 0
            row_of_token = starts.cumsum(0) - 1
            bounds = torch.cat([starts.nonzero().flatten(), torch.tensor([starts.numel()], device=starts.device)])
            lengths = bounds.diff()
            group_of_row = torch.arange(lengths.numel(), device=lengths.device) // self.group_rows
            group_length = _group_max(lengths, group_of_row)[group_of_row][row_of_token][None]
        else:  # neither: the batch tensor's own length, as TRL does
            group_length = torch.full(embeddings.shape[:2], embeddings.size(1), device=embeddings.device)
        return (self.alpha / torch.sqrt(group_length.float() * embeddings.size(-1)))[..., None]


def _group_max(values, groups):
    import torch

    out = torch.zeros(int(groups.max()) + 1, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, groups, values, reduce="amax")

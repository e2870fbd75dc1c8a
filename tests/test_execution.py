"""How a step is executed: the compiled decoder layers compute what the eager ones do."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ray_sft import data, execution, modeling, train
from tests.conftest import quick_spec


def _decoder_layers_compiled_at_train_begin(tmp_path, model_path, setting: str, steps: int) -> list[bool]:
    job = quick_spec(tmp_path, f"training.compile={setting}", "data.max_rows=16", "data.eval_rows=0")
    trainer = _trainer(job, model_path, tmp_path)
    # What Trainer.train does once it has counted the run's optimizer steps, without training.
    trainer.state.max_steps = steps
    trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)
    return [layer._compiled_call_impl is not None for layer in trainer.model.base_model.model.model.layers]


def test_compile_true_compiles_every_decoder_layer_with_eager_rounding(tmp_path, tiny_model_path):
    import torch._inductor.config

    torch._inductor.config.emulate_precision_casts = False
    compiled = _decoder_layers_compiled_at_train_begin(tmp_path, tiny_model_path, "true", steps=3)
    assert len(compiled) >= 2 and all(compiled)
    # Without it inductor's bf16 loss curve parts from eager's on the GPU (bench/RESULTS.md, "Stop 26").
    assert torch._inductor.config.emulate_precision_casts is True


def test_compile_auto_leaves_a_cpu_run_eager_however_long(tmp_path, tiny_model_path):
    compiled = _decoder_layers_compiled_at_train_begin(tmp_path, tiny_model_path, "auto", steps=100_000)
    assert compiled and not any(compiled)


@pytest.mark.parametrize("setting, device_type, steps, wanted", [
    ("auto", "cuda", execution.COMPILE_PAYS_AFTER_STEPS, True),
    ("auto", "cuda", execution.COMPILE_PAYS_AFTER_STEPS - 1, False),  # the recipe's 47 steps: eager
    ("auto", "cpu", 10 * execution.COMPILE_PAYS_AFTER_STEPS, False),
    (True, "cpu", 1, True),
    (False, "cuda", 10 * execution.COMPILE_PAYS_AFTER_STEPS, False),
])
def test_compile_wanted(setting, device_type, steps, wanted):
    assert execution.compile_wanted(setting, device_type, steps) is wanted


def _trainer(job, model_path, tmp_path):
    tokenizer = modeling.load_tokenizer(model_path, job.model)
    rows = data.load_examples(job, tokenizer).train
    return train.build_trainer(job, model_path, tokenizer, rows, [], "cpu", str(tmp_path / "out"))


def _trainer_compiling(tmp_path, model_path, monkeypatch, compiled: bool, *overrides: str, backend="aot_eager"):
    """A trainer of three optimizer steps of one forward pass each, its layers compiled (or not) where a run
    compiles them: at train begin, after the Trainer has set up gradient checkpointing.

    aot_eager: Dynamo's graph capture and AOTAutograd's forward/backward, as on CUDA, without inductor's code
    generation (minutes of C++ compiling on 2 cores); CUDA runs inductor on the same graphs. It splits them without
    inductor's partitioner, which decides what a checkpointed layer recomputes (_one_step splits with it).
    """
    import torch

    def compile_anew(model):
        # Dynamo would reuse an earlier test's graphs of the same layer code, split for other settings.
        torch._dynamo.reset()
        return execution.compile_layers(model, backend=backend)

    monkeypatch.setattr(train, "compile_layers", compile_anew)
    # No LoRA dropout: inductor and eager draw dropout masks from different generators; NEFTune's noise stays
    # (its hook runs outside the compiled layers and draws the same numbers either way).
    job = quick_spec(tmp_path, "training.max_steps=3", "training.logging_steps=1", "data.max_rows=48",
                     "data.eval_rows=0", "lora.dropout=0", f"training.compile={str(compiled).lower()}",
                     "training.per_device_batch_size=4", "training.gradient_accumulation_steps=2",
                     "training.micro_batch_size=8", "training.padding_free=true", *overrides)
    return _trainer(job, model_path, tmp_path)


def _train(tmp_path, model_path, monkeypatch, compiled: bool, *overrides: str) -> SimpleNamespace:
    """What the three steps logged, the trained weights and, compiled, how Dynamo captured the layers."""
    import torch
    from torch._dynamo.utils import counters

    trainer = _trainer_compiling(tmp_path, model_path, monkeypatch, compiled, *overrides)
    counters.clear()
    trainer.train()
    return SimpleNamespace(
        losses=[entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        weights={n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad},
        graphs=counters["stats"]["unique_graphs"], breaks=dict(counters["graph_break"]), torch=torch)


def test_compiled_checkpointed_layers_train_as_eager_ones(tmp_path, tiny_model_path, monkeypatch):
    setting = "training.gradient_checkpointing=true"  # as the fast spec trains
    eager = _train(tmp_path / "eager", tiny_model_path, monkeypatch, False, setting)
    compiled = _train(tmp_path / "compiled", tiny_model_path, monkeypatch, True, setting)
    assert compiled.graphs >= 1 and not compiled.breaks  # the whole layer is one graph, checkpoint included
    assert execution.compile_seconds() > 0  # what a compiled run reports as its compile time
    assert len(compiled.losses) == len(eager.losses) == 3
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    assert compiled.weights.keys() == eager.weights.keys()
    for name, tensor in compiled.weights.items():
        assert eager.torch.allclose(tensor, eager.weights[name], rtol=1e-4, atol=1e-6), name


def test_training_on_the_dequantized_base_gives_the_4bit_runs_losses_and_weights(tmp_path, tiny_model_path,
                                                                                 monkeypatch):
    import bitsandbytes as bnb

    quantized = _train(tmp_path / "4bit", tiny_model_path, monkeypatch, False)
    dense = _train(tmp_path / "dense", tiny_model_path, monkeypatch, False, "training.dequantize_base=true")
    assert len(quantized.losses) == 3 and dense.losses == quantized.losses
    assert dense.weights.keys() == quantized.weights.keys()
    for name, tensor in dense.weights.items():
        assert dense.torch.equal(tensor, quantized.weights[name]), name
    trainer = _trainer(quick_spec(tmp_path / "check", "training.dequantize_base=true", "data.max_rows=16",
                                  "data.eval_rows=0"), tiny_model_path, tmp_path)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())


def _one_step(tmp_path, model_path, monkeypatch, checkpointing: bool, compiled: bool) -> SimpleNamespace:
    """One training step with LoRA dropout: the bytes of the activations it keeps for its backward (each storage
    counted once; the weights, which every configuration keeps, left out) and the graphs it ran if compiled."""
    import torch
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    graphs = SimpleNamespace(forward=[], backward=[])

    def kept(graph_list):
        def compiler(graph, example_inputs):
            graph_list.append(graph)
            return make_boxed_func(graph.forward)
        return compiler

    # aot_eager_decomp_partition's parts (inductor's decompositions and partitioner), graphs kept for a look.
    backend = aot_autograd(fw_compiler=kept(graphs.forward), bw_compiler=kept(graphs.backward),
                           partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
    trainer = _trainer_compiling(tmp_path, model_path, monkeypatch, compiled, "training.max_steps=1",
                                 "lora.dropout=0.1", f"training.gradient_checkpointing={str(checkpointing).lower()}",
                                 backend=backend)
    weights = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    storages = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trainer.train()
    return SimpleNamespace(saved_bytes=sum(storages.values()), graphs=graphs)


def _draws_random_numbers(graph) -> bool:
    """Whether the graph draws random numbers of its own (not replaying a saved generator state)."""
    import torch

    return any(isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags
               and node.target.name() not in ATTENTION_WITH_DROPOUT_ARGUMENT for node in graph.graph.nodes)


# Tagged as random for their dropout_p argument, which is 0 in training here (LoRA's dropout is its own op).
ATTENTION_WITH_DROPOUT_ARGUMENT = ("aten::_scaled_dot_product_flash_attention_for_cpu",)


def _replays_random_numbers(graph) -> bool:
    return any("rng_state" in str(node.target) for node in graph.graph.nodes)


def test_a_compiled_checkpointed_layer_stays_checkpointed_and_replays_its_dropout_masks(tmp_path, tiny_model_path,
                                                                                      monkeypatch):
    """transformers 5.24 (the pinned one) checkpoints inside each layer's forward, so Dynamo traces the checkpoint
    and inductor's partitioner decides what the compiled backward recomputes. (5.17 checkpoints around the compiled
    call; torch's eager checkpointing then restores the generator itself.)"""
    checkpointed = _one_step(tmp_path / "checkpointed", tiny_model_path, monkeypatch, True, compiled=True)
    unchecked = _one_step(tmp_path / "unchecked", tiny_model_path, monkeypatch, False, compiled=False)
    # Checkpointed, a compiled layer keeps its inputs (here 12% of what an eager step keeps without checkpointing),
    # among them the packed rows' attention mask and rotary tables, which all layers share and eager checkpointing
    # holds by reference instead: so the yardstick is the unchecked step, not eager checkpointing's count.
    assert checkpointed.saved_bytes < 0.25 * unchecked.saved_bytes
    # The recompute must use the forward's dropout masks: drawing new ones, the backward would differentiate another
    # function than the forward computed (what an activation memory budget of 0 does: bench/RESULTS.md, "Stop 30").
    assert checkpointed.graphs.backward
    assert all(_replays_random_numbers(g) for g in checkpointed.graphs.forward + checkpointed.graphs.backward)
    assert not any(_draws_random_numbers(g) for g in checkpointed.graphs.backward)

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


FOUR_BIT, DENSE = execution.COMPILE_PAYS_AFTER_STEPS["4-bit"], execution.COMPILE_PAYS_AFTER_STEPS["dense"]


@pytest.mark.parametrize("setting, device_type, steps, four_bit_layers, wanted", [
    ("auto", "cuda", FOUR_BIT, True, True),
    ("auto", "cuda", FOUR_BIT - 1, True, False),
    ("auto", "cuda", DENSE, False, True),  # the dequantized base pays back sooner
    ("auto", "cuda", DENSE - 1, False, False),
    ("auto", "cuda", 47, False, False),  # the recipe's 47 steps: eager
    ("auto", "cpu", 10 * FOUR_BIT, False, False),
    (True, "cpu", 1, True, True),
    (False, "cuda", 10 * FOUR_BIT, False, False),
])
def test_compile_wanted(setting, device_type, steps, four_bit_layers, wanted):
    assert execution.compile_wanted(setting, device_type, steps, four_bit_layers) is wanted


def _trainer(job, model_path, tmp_path):
    tokenizer = modeling.load_tokenizer(model_path, job.model)
    rows = data.load_examples(job, tokenizer).train
    return train.build_trainer(job, model_path, tokenizer, rows, [], "cpu", str(tmp_path / "out"))


def _trainer_compiling(tmp_path, model_path, monkeypatch, compiled: bool, *overrides: str, backend="aot_eager"):
    """A trainer of three optimizer steps of one forward pass each, its layers compiled (or not) where a run
    compiles them: at train begin, after the Trainer has set up gradient checkpointing.

    aot_eager: Dynamo's graph capture and AOTAutograd's forward/backward, as on CUDA, without inductor's code
    generation (minutes of C++ compiling on 2 cores); CUDA runs inductor on the same graphs. It splits them without
    inductor's partitioner, which decides what a checkpointed layer recomputes (_one_compiled_step splits with it).
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
    assert compiled.graphs >= 1 and not compiled.breaks  # the whole layer is one graph
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


def _one_compiled_step(tmp_path, model_path, monkeypatch, checkpointing: bool) -> SimpleNamespace:
    """One training step of compiled layers with LoRA dropout: the bytes of the activations it keeps for its
    backward (each storage counted once; the weights, which every configuration keeps, left out) and its
    gradients."""
    import torch
    from transformers import TrainerCallback

    trainer = _trainer_compiling(tmp_path, model_path, monkeypatch, True, "training.max_steps=1",
                                 "lora.dropout=0.1", f"training.gradient_checkpointing={str(checkpointing).lower()}",
                                 backend="aot_eager_decomp_partition")  # with inductor's partitioner
    gradients = {}

    class KeepGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            gradients.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    trainer.add_callback(KeepGradients())
    weights = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    storages = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trainer.train()
    return SimpleNamespace(saved_bytes=sum(storages.values()), gradients=gradients, torch=torch)


def test_a_compiled_checkpointed_layer_stays_checkpointed_and_recomputes_with_the_forwards_dropout_masks(
        tmp_path, tiny_model_path, monkeypatch):
    checkpointed = _one_compiled_step(tmp_path / "checkpointed", tiny_model_path, monkeypatch, checkpointing=True)
    unchecked = _one_compiled_step(tmp_path / "unchecked", tiny_model_path, monkeypatch, checkpointing=False)
    # Checkpointed, a compiled layer keeps only its inputs.
    assert checkpointed.saved_bytes < 0.25 * unchecked.saved_bytes
    # The same seed, so the same masks in both forwards; a recompute that drew new ones would differentiate another
    # function than the forward computed (an activation memory budget of 0 does that: bench/RESULTS.md, "Stop 30").
    assert checkpointed.gradients.keys() == unchecked.gradients.keys() and checkpointed.gradients
    for name, gradient in checkpointed.gradients.items():
        assert checkpointed.torch.allclose(gradient, unchecked.gradients[name], rtol=1e-4, atol=1e-7), name

"""How a step is executed: the compiled decoder layers compute what the eager ones do."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ray_sft import data, execution, modeling, train
from tests.conftest import quick_spec


@pytest.fixture(autouse=True)
def default_activation_memory_budget():
    """Each test starts from torch's default, as a training process does (checkpoint_in_graph changes it)."""
    import torch._functorch.config

    with torch._functorch.config.patch(activation_memory_budget=1.0):
        yield


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
    compiles them (at train begin, after the Trainer has set up gradient checkpointing), and the list its compiled
    layers append to on every call.

    aot_eager: Dynamo's graph capture and AOTAutograd's forward/backward, as on CUDA, without inductor's code
    generation (minutes of C++ compiling on 2 cores); CUDA runs inductor on the same graphs. It splits them without
    inductor's partitioner, which decides what a checkpointed layer recomputes: aot_eager_decomp_partition has it
    (and inductor's decompositions, which round differently from eager).
    """
    import torch

    calls = []

    def compile_counting_calls(model):
        # Compiled anew: Dynamo would reuse an earlier test's graphs of the same layer code, split for other settings.
        torch._dynamo.reset()
        compiled_layers = execution.compile_layers(model, backend=backend)
        for layer in model.base_model.model.model.layers:
            layer._compiled_call_impl = _counted(layer._compiled_call_impl, calls)
        return compiled_layers

    monkeypatch.setattr(train, "compile_layers", compile_counting_calls)
    # No LoRA dropout: inductor and eager draw dropout masks from different generators; NEFTune's noise stays
    # (its hook runs outside the compiled layers and draws the same numbers either way).
    job = quick_spec(tmp_path, "training.max_steps=3", "training.logging_steps=1", "data.max_rows=48",
                     "data.eval_rows=0", "lora.dropout=0", f"training.compile={str(compiled).lower()}",
                     "training.per_device_batch_size=4", "training.gradient_accumulation_steps=2",
                     "training.micro_batch_size=8", "training.padding_free=true", *overrides)
    return _trainer(job, model_path, tmp_path), calls


def _counted(fn, calls: list):
    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return counted


def _train(tmp_path, model_path, monkeypatch, compiled: bool, *overrides: str) -> SimpleNamespace:
    """What the three steps logged, the trained weights and, compiled, how Dynamo captured the layers and how many
    times a compiled layer was called."""
    import torch
    from torch._dynamo.utils import counters

    trainer, calls = _trainer_compiling(tmp_path, model_path, monkeypatch, compiled, *overrides)
    counters.clear()
    trainer.train()
    return SimpleNamespace(
        losses=[entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        weights={n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad},
        graphs=counters["stats"]["unique_graphs"], breaks=dict(counters["graph_break"]), layer_calls=len(calls),
        torch=torch)


def test_compiled_checkpointed_layers_train_as_eager_ones(tmp_path, tiny_model_path, monkeypatch):
    setting = "training.gradient_checkpointing=true"  # as the fast spec trains
    eager = _train(tmp_path / "eager", tiny_model_path, monkeypatch, False, setting)
    compiled = _train(tmp_path / "compiled", tiny_model_path, monkeypatch, True, setting)
    assert compiled.graphs >= 1 and not compiled.breaks  # the whole layer is one graph, checkpoint included
    assert execution.compile_seconds() > 0  # what a compiled run reports as its compile time
    # One call per layer and step: a checkpointed layer recomputes inside its compiled backward, not by being
    # called again from Python (transformers 5.17 checkpoints around the call; execution.checkpoint_in_graph).
    assert compiled.layer_calls == 3 * 2
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


def _saved_bytes(tmp_path, model_path, monkeypatch, checkpointing: bool, compiled: bool) -> int:
    """Bytes of the activations one training step keeps for its backward (each storage counted once; the weights,
    which every configuration keeps, left out)."""
    import torch
    import torch._functorch.config

    torch._functorch.config.activation_memory_budget = 1.0  # as a new process has it; the fixture restores it
    trainer, _ = _trainer_compiling(tmp_path, model_path, monkeypatch, compiled, "training.max_steps=1",
                                    f"training.gradient_checkpointing={str(checkpointing).lower()}",
                                    backend="aot_eager_decomp_partition")
    weights = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    storages = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trainer.train()
    return sum(storages.values())


def test_a_compiled_layer_stays_checkpointed(tmp_path, tiny_model_path, monkeypatch):
    checkpointed = _saved_bytes(tmp_path / "checkpointed", tiny_model_path, monkeypatch, True, compiled=True)
    unchecked = _saved_bytes(tmp_path / "unchecked", tiny_model_path, monkeypatch, False, compiled=True)
    # Checkpointed, a compiled layer keeps its inputs (here 13% of what it keeps without checkpointing), among
    # them the packed rows' attention mask and rotary tables, which all layers share and eager checkpointing holds
    # by reference instead: so the yardstick is the unchecked run, not eager's count.
    assert checkpointed < 0.25 * unchecked

"""How a step is executed: the compiled decoder layers compute what the eager ones do."""

from __future__ import annotations

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


def _losses_and_weights(tmp_path, model_path, compiled: bool, *overrides: str):
    import torch
    from torch._dynamo.utils import counters

    # No LoRA dropout: inductor and eager draw dropout masks from different generators; NEFTune's noise stays
    # (its hook runs outside the compiled layers and draws the same numbers either way).
    job = quick_spec(tmp_path, "training.max_steps=3", "training.logging_steps=1", "data.max_rows=48",
                     "data.eval_rows=0", "lora.dropout=0", "training.compile=false",
                     "training.per_device_batch_size=4", "training.gradient_accumulation_steps=2",
                     "training.micro_batch_size=8", "training.padding_free=true", *overrides)
    trainer = _trainer(job, model_path, tmp_path)
    if compiled:
        counters.clear()
        # aot_eager: Dynamo's graph capture and AOTAutograd's forward/backward, as on CUDA, without inductor's
        # code generation (minutes of C++ compiling on 2 cores); CUDA runs inductor on the same graphs.
        assert execution.compile_layers(trainer.model, backend="aot_eager") == 2
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    captured = dict(counters["stats"]) if compiled else {}
    breaks = dict(counters["graph_break"]) if compiled else {}
    return losses, weights, captured, breaks, torch


def test_compiled_layers_train_as_eager_ones(tmp_path, tiny_model_path):
    eager_losses, eager_weights, _, _, _ = _losses_and_weights(tmp_path / "eager", tiny_model_path, False)
    losses, weights, captured, breaks, torch = _losses_and_weights(tmp_path / "compiled", tiny_model_path, True)
    assert captured.get("unique_graphs", 0) >= 1 and not breaks  # the whole layer is one graph
    assert execution.compile_seconds() > 0  # what a compiled run reports as its compile time
    assert len(losses) == len(eager_losses) == 3
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert weights.keys() == eager_weights.keys()
    for name, tensor in weights.items():
        assert torch.allclose(tensor, eager_weights[name], rtol=1e-4, atol=1e-6), name


def test_training_on_the_dequantized_base_gives_the_4bit_runs_losses_and_weights(tmp_path, tiny_model_path):
    import bitsandbytes as bnb

    losses, weights, _, _, torch = _losses_and_weights(tmp_path / "4bit", tiny_model_path, False)
    dense_losses, dense_weights, _, _, _ = _losses_and_weights(tmp_path / "dense", tiny_model_path, False,
                                                               "training.dequantize_base=true")
    assert len(losses) == 3 and dense_losses == losses
    assert dense_weights.keys() == weights.keys()
    for name, tensor in dense_weights.items():
        assert torch.equal(tensor, weights[name]), name
    trainer = _trainer(quick_spec(tmp_path / "check", "training.dequantize_base=true", "data.max_rows=16",
                                  "data.eval_rows=0"), tiny_model_path, tmp_path)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())

"""How a step is executed: the compiled decoder layers compute what the eager ones do."""

from __future__ import annotations

import pytest

from ray_sft import data, execution, modeling, train
from tests.conftest import quick_spec


def test_compile_true_compiles_every_decoder_layer(tmp_path, tiny_model_path):
    job = quick_spec(tmp_path, "training.compile=true", "data.max_rows=16", "data.eval_rows=0")
    trainer = _trainer(job, tiny_model_path, tmp_path)
    layers = trainer.model.base_model.model.model.layers
    assert len(layers) >= 2 and all(layer._compiled_call_impl is not None for layer in layers)


def _trainer(job, model_path, tmp_path):
    tokenizer = modeling.load_tokenizer(model_path, job.model)
    rows = data.load_examples(job, tokenizer).train
    return train.build_trainer(job, model_path, tokenizer, rows, [], "cpu", str(tmp_path / "out"))


def _losses_and_weights(tmp_path, model_path, compiled: bool):
    import torch
    from torch._dynamo.utils import counters

    # No LoRA dropout: inductor and eager draw dropout masks from different generators; NEFTune's noise stays
    # (its hook runs outside the compiled layers and draws the same numbers either way).
    job = quick_spec(tmp_path, "training.max_steps=3", "training.logging_steps=1", "data.max_rows=48",
                     "data.eval_rows=0", "lora.dropout=0", "training.compile=false",
                     "training.per_device_batch_size=4", "training.gradient_accumulation_steps=2",
                     "training.micro_batch_size=8", "training.padding_free=true")
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
    assert len(losses) == len(eager_losses) == 3
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert weights.keys() == eager_weights.keys()
    for name, tensor in weights.items():
        assert torch.allclose(tensor, eager_weights[name], rtol=1e-4, atol=1e-6), name

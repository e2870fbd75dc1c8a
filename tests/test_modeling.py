"""Real 4-bit loading on CPU, LoRA placement, and the bitsandbytes CPU repack regression."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from ray_sft import modeling
from tests.conftest import quick_spec

LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture
def job(tmp_path):
    return quick_spec(tmp_path, "lora.dropout=0.0")


@pytest.mark.parametrize("chosen, device, padding_free, training, expected", [
    ("auto", "cuda:0", True, True, "varlen"),  # the fast default where it applies
    ("auto", "cuda:0", True, False, "sdpa"),  # generation: KV cache and padded prompts
    ("auto", "cuda:0", False, True, "sdpa"),  # padded batches (the recipe's own execution)
    ("auto", "cpu", True, True, "sdpa"),  # torch's varlen kernel is CUDA-only
    ("varlen", "cuda:0", True, False, "sdpa"),
    ("flex_attention", "cuda:0", True, True, "flex_attention"),  # an explicit choice is kept
])
def test_attention_kernel_follows_device_batching_and_use(tmp_path, chosen, device, padding_free, training, expected):
    job = quick_spec(tmp_path)
    job.model.attn_implementation, job.training.padding_free = chosen, padding_free
    assert modeling.attention(job, device, training) == expected


def test_tokenizer_follows_the_recipe(job, tiny_model_path):
    tokenizer = modeling.load_tokenizer(tiny_model_path, job.model)
    assert tokenizer.padding_side == "right"
    assert tokenizer.pad_token is not None


def test_4bit_loading_yields_linear4bit_except_lm_head(job, tiny_model_path):
    model = modeling.load_model(tiny_model_path, job, "cpu")
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 7 * model.config.num_hidden_layers
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    weight = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)).weight
    assert weight.quant_state.quant_type == "nf4"
    assert weight.quant_state.nested  # double quantization
    assert model.config.use_cache is False


def test_lora_lands_on_every_4bit_linear_and_saves_embeddings(job, tiny_model_path):
    from peft import get_peft_model

    model = modeling.load_model(tiny_model_path, job, "cpu")
    targets = modeling.lora_targets(model, job.lora)
    assert targets == LLAMA_LINEARS
    expected = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    peft_model = get_peft_model(model, modeling.lora_config(job.lora, targets))
    lora_modules = {n.removeprefix("base_model.model.").removesuffix(".lora_A")
                    for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert lora_modules == expected
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)


def test_dequantized_base_layers_compute_what_the_4bit_ones_do(job, tiny_model_path):
    from peft import get_peft_model

    model = modeling.load_model(tiny_model_path, job, "cpu")
    model = get_peft_model(model, modeling.lora_config(job.lora, modeling.lora_targets(model, job.lora)))
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    torch.manual_seed(0)
    inputs = {n: torch.randn(2, 5, m.in_features) for n, m in quantized.items()}
    with torch.no_grad():
        expected = {n: quantized[n](inputs[n]) for n in quantized}

    assert modeling.dequantize_base(model) == len(quantized) == 7 * model.config.num_hidden_layers
    layers = dict(model.named_modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in layers.values())
    with torch.no_grad():
        for name, out in expected.items():
            dense = layers[name]
            assert isinstance(dense, modeling.DequantizedLinear) and not dense.weight.requires_grad
            assert torch.equal(dense(inputs[name]), out), name
    # LoRA still wraps every replaced layer and still trains.
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(".lora_A." in n for n in trainable) == len(quantized)


def test_explicit_target_list_is_used_as_given(tmp_path, tiny_model_path):
    job = quick_spec(tmp_path, "lora.target_modules=[q_proj, v_proj]", "lora.modules_to_save=[]")
    model = modeling.load_model(tiny_model_path, job, "cpu")
    assert modeling.lora_targets(model, job.lora) == ["q_proj", "v_proj"]
    assert modeling.lora_config(job.lora, ["q_proj"]).modules_to_save is None


def _lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _grads_before_and_after_eval(job, tiny_model_path, fix: bool):
    from peft import get_peft_model

    model = modeling.load_model(tiny_model_path, job, "cpu", training=True)
    if not fix:  # bitsandbytes' own default, which load_model overrides on CPU
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = True
    model = get_peft_model(model, modeling.lora_config(job.lora, modeling.lora_targets(model, job.lora)))
    torch.manual_seed(0)
    for name, param in model.named_parameters():  # LoRA B starts at zero: give A's gradient something to see
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    ids = torch.randint(5, model.config.vocab_size, (2, 24))
    batch = {"input_ids": ids, "labels": ids}
    model.train()
    before = _lora_grads(model, batch)
    model.eval()
    with torch.no_grad():  # what evaluate() and generate() do: bnb repacks 4-bit weights here unless disabled
        model(input_ids=ids)
    model.train()
    after = _lora_grads(model, batch)
    return before, after


def test_a_model_loaded_for_inference_on_cpu_is_not_repacked_either(job, tiny_model_path):
    """The repacked kernel computes in bf16 and rounds by batch size: served and generated text would depend on
    which requests share a batch (see modeling.disable_cpu_repack)."""
    model = modeling.load_model(tiny_model_path, job, "cpu", training=False)
    disabled, layers = modeling.cpu_repack_disabled(model)
    assert layers > 0 and disabled == layers


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(),
                    reason="bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16: without one the "
                           "gradients match with or without the fix, so this test could not fail here")
def test_gradients_after_an_eval_pass_equal_gradients_before_it(job, tiny_model_path):
    before, after = _grads_before_and_after_eval(job, tiny_model_path, fix=True)
    assert before.keys() == after.keys() and before
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(),
                    reason="the repack only happens on CPUs with AVX512-BF16")
def test_without_the_fix_gradients_drift_after_eval(job, tiny_model_path):
    """Shows the regression test above can fail: without disable_cpu_repack the gradients change."""
    before, after = _grads_before_and_after_eval(job, tiny_model_path, fix=False)
    drift = max((after[n] - before[n]).abs().max().item() / (before[n].abs().max().item() + 1e-12) for n in before)
    assert drift > 1e-3

"""Tokenizer set-up, 4-bit loading onto a device the caller names, LoRA targets and config.

Never picks a device for a worker and never uses device_map="auto" for training: under Ray Train each worker
pins its own device and says which one.
"""

from __future__ import annotations

import functools
import logging

import torch

from ray_sft.spec import JobSpec, LoraSpec, ModelSpec, QuantizationSpec

log = logging.getLogger(__name__)

TINY = "tiny"
AUTO = "auto"
# model.attn_implementation for padding-free training through torch's varlen (flash) attention kernel.
VARLEN = "varlen"


class ModelError(FileNotFoundError):
    """A model that cannot be found as the spec names it; the message names the id and revision.

    A FileNotFoundError so that the CLI reports it as bad input (exit 2) without importing torch to catch it.
    """


def resolve_model_path(spec: JobSpec) -> str:
    """The path or Hub id to load; "tiny" builds (once, cached) the offline tiny model on the spec's data."""
    if spec.model.name_or_path != TINY:
        return spec.model.name_or_path
    from ray_sft import tiny

    return str(tiny.ensure_tiny_model(spec.data.source))


def load_tokenizer(path: str, model: ModelSpec):
    """The recipe's tokenizer set-up: right padding, pad = eos when the tokenizer has no pad token.

    The recipe also passed add_eos_token=True; we append EOS to the text itself instead (data.format_rows), so
    the tokenizer must not add a second one.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=model.revision,
                                                  trust_remote_code=model.trust_remote_code)
    except OSError as exc:  # transformers' one error for an unknown id, a missing revision, no network, no access
        raise ModelError(f"model.name_or_path: cannot load {path!r}"
                         + (f" at revision {model.revision!r}" if model.revision else "")
                         + f" (check the id, model.revision, HF_ENDPOINT and HF_TOKEN): {exc}") from None
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def compute_dtype(quantization: QuantizationSpec) -> torch.dtype:
    return getattr(torch, quantization.compute_dtype)


def bnb_config(quantization: QuantizationSpec):
    from transformers import BitsAndBytesConfig

    if not quantization.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(quantization),
    )


def load_model(path: str, spec: JobSpec, device: str | torch.device, training: bool = True):
    """The base model (4-bit when the spec says so) with every weight on `device`.

    On CPU every model gets the bitsandbytes repack disabled (see disable_cpu_repack), for training and inference.
    """
    from transformers import AutoModelForCausalLM

    attn_implementation = attention(spec, device, training)
    if attn_implementation == VARLEN:
        register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=spec.model.revision,
        quantization_config=bnb_config(spec.quantization),
        device_map={"": str(device)},
        dtype=compute_dtype(spec.quantization),
        trust_remote_code=spec.model.trust_remote_code,
        attn_implementation=attn_implementation,
    )
    if training:
        model.config.use_cache = False
    if torch.device(device).type == "cpu":
        disable_cpu_repack(model)
    return model


def attention(spec: JobSpec, device: str | torch.device, training: bool) -> str:
    """The attention kernel a model is loaded with.

    "auto" picks varlen where it applies (padding-free training batches on CUDA: 1.6x over sdpa on the H200, see
    bench/RESULTS.md) and sdpa elsewhere. Generation (KV cache, padded prompts) never uses varlen.
    """
    chosen = spec.model.attn_implementation
    if chosen == AUTO:
        cuda = torch.device(device).type == "cuda"
        chosen = VARLEN if training and cuda and spec.training.padding_free and _has_varlen() else "sdpa"
    return "sdpa" if chosen == VARLEN and not training else chosen


def _has_varlen() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch.nn.attention.varlen") is not None  # torch >= 2.10


def register_varlen_attention() -> None:
    """Make `attn_implementation="varlen"` known to transformers (idempotent).

    Padding-free rows arrive as one packed sequence; sdpa would need an N x N block mask (quadratic in the packed
    length) and flex attention a compile per shape. torch's varlen_attn runs flash attention per row directly from
    the row boundaries TRL's padding-free collator passes along (cu_seq_lens_q / max_length_q).
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    # The flash mask is None for unpadded input: no mask is built at all.
    AttentionMaskInterface.register(VARLEN, flash_attention_mask)


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers attention interface -> torch.nn.attention.varlen.varlen_attn, causal within each packed row."""
    from torch.nn.attention.varlen import varlen_attn

    if query.size(0) != 1 or kwargs.get("cu_seq_lens_q") is None:
        raise ValueError("attn_implementation=varlen needs padding-free batches (training.padding_free: true)")
    if dropout:
        raise ValueError("attn_implementation=varlen has no attention dropout")
    # (1, heads, tokens, dim) -> (tokens, heads, dim)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    options = {"scale": scaling, **_varlen_causal()}
    if k.size(1) != q.size(1):
        options["enable_gqa"] = True
    cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    out = varlen_attn(q, k, v, cu, kwargs.get("cu_seq_lens_k", cu), longest, kwargs.get("max_length_k", longest),
                      **options)
    return out[None], None  # (1, tokens, heads, dim), as the other kernels return


@functools.cache
def _varlen_causal() -> dict:
    """varlen_attn's causal option, looked up once (this runs in every attention call): newer torch takes a
    (left, right) window, (-1, 0) being causal; older releases an is_causal flag."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    windowed = "window_size" in inspect.signature(varlen_attn).parameters
    return {"window_size": (-1, 0)} if windowed else {"is_causal": True}


def disable_cpu_repack(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for AVX512-BF16 on their first no-grad eval forward.

    bitsandbytes 0.50 repacks a Linear4bit weight in place the first time it runs in eval mode without grad;
    backward then goes through an op with no autograd kernel and LoRA gradients come out wrong (measured 106%
    off) with only a warning. Inference suffers too: the repacked kernel computes in bf16 whatever the spec's
    compute_dtype, and its rounding depends on how many rows share the batch (on an AVX512-BF16 CPU, a served
    batch's greedy text differed from the same prompts one by one, and merged logits from the adapter's by 2e-3).
    Every process that loads a 4-bit model on CPU calls this right after loading. Returns how many modules changed.
    """
    import bitsandbytes as bnb

    from ray_sft.couplings import require

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # A renamed attribute would make this assignment a silent no-op and the gradients wrong again.
            require("bitsandbytes", module, "support_avx512bf16_for_cpu")
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def cpu_repack_disabled(model) -> tuple[int, int]:
    """(4-bit layers with the repack disabled, all 4-bit layers): what a training process reports in its audit."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    return sum(getattr(m, "support_avx512bf16_for_cpu", True) is False for m in layers), len(layers)


class DequantizedLinear(torch.nn.Module):
    """A frozen bitsandbytes Linear4bit's forward from its weights dequantized once: the input cast to the layer's
    compute dtype, a dense matmul, the result cast back to the input's dtype (what Linear4bit does in training,
    where bitsandbytes dequantizes the 4-bit weights for every matmul)."""

    def __init__(self, layer):
        import bitsandbytes as bnb

        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        dtype = layer.compute_dtype or layer.weight.quant_state.dtype
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.weight.dtype)
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)


def dequantize_base(model) -> int:
    """Replace every 4-bit linear layer under `model` by a DequantizedLinear, in place; return how many.

    For training.dequantize_base: on a GPU whose step is bound by the host issuing kernels, bitsandbytes'
    dequantizing in every forward and backward matmul (and its Python) is part of the step. The copy holds the
    values the 4-bit layer computes with, so the step computes the same numbers; the base weights take 2 bytes per
    parameter in bf16 instead of about half a byte. LoRA's wrappers keep calling their base layer. (transformers'
    model.dequantize(), which serving uses before any adapter, would have to run before PEFT: the model would then
    be prepared as a bf16 one, not as a 4-bit one as the recipe trains it.)
    """
    import bitsandbytes as bnb

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                setattr(parent, name, DequantizedLinear(child))
                replaced += 1
    return replaced


def lora_targets(model, lora: LoraSpec) -> list[str]:
    """Module names LoRA attaches to: an explicit list, or every 4-bit linear layer's name but lm_head.

    As in the recipe, names are the last component (q_proj, ..., down_proj); an unquantized model falls back to
    every nn.Linear.
    """
    if isinstance(lora.target_modules, list):
        return list(lora.target_modules)
    import bitsandbytes as bnb

    quantized = any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    kind = bnb.nn.Linear4bit if quantized else torch.nn.Linear
    names = {name.split(".")[-1] for name, module in model.named_modules() if isinstance(module, kind)}
    names.discard("lm_head")
    return sorted(names)


def lora_config(lora: LoraSpec, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        task_type="CAUSAL_LM",
        target_modules=targets,
        modules_to_save=list(lora.modules_to_save) or None,
    )


def load_adapter_model(base_path: str, adapter_path: str, spec: JobSpec, device: str | torch.device):
    """Base (as trained: 4-bit when the spec says so) plus a PEFT adapter, ready for inference."""
    from peft import PeftModel

    model = load_model(base_path, spec, device, training=False)
    model = PeftModel.from_pretrained(model, adapter_path)
    model.eval()
    return model

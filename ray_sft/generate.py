"""Local inference with the recipe's decoding: base (as trained) + adapter, inference template, greedy.

Needs no Ray. `serve` uses the same pieces per replica: `load_base`/`add_adapter` to build one base with several
adapters, and `complete` to run a left-padded batch whose greedy text equals running the prompts one by one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from ray_sft import data, modeling
from ray_sft.spec import GenerationSpec, JobSpec, from_dict, is_hub_id, with_values

log = logging.getLogger(__name__)


class AdapterError(ValueError):
    """An adapter folder whose files cannot be trusted as they are (a malformed recorded base): exit 2."""


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop": EOS or a stop string; "length": max_new_tokens reached; "cancelled" (engine)


@dataclass
class Loaded:
    model: object
    tokenizer: object
    spec: JobSpec  # loading and decoding settings the adapter was trained with (defaults if unknown)


# ---------------------------------------------------------------------------------------------------------------
# What an adapter folder says about itself


def run_spec(adapter_dir: str | Path, trust_remote_code: bool = False) -> JobSpec:
    """The spec of the run that wrote the adapter: <run>/spec.yaml for <run>/adapter or <run>/best/adapter.

    Only its loading settings (quantization, model options) and decoding defaults matter here; an adapter
    without a run folder gets the defaults. Its trust_remote_code is replaced by the caller's: an adapter folder
    may come from anyone, and running a model repo's own code is the user's decision (spec or command line).
    """
    adapter_dir = Path(adapter_dir).resolve()
    spec = JobSpec()
    for folder in (adapter_dir.parent, adapter_dir.parent.parent):
        if (folder / "spec.yaml").is_file():
            spec = from_dict(yaml.safe_load((folder / "spec.yaml").read_text(encoding="utf-8")) or {})
            break
    return with_values(spec, {"model.trust_remote_code": trust_remote_code})


def base_of(adapter_dir: str | Path) -> str:
    """The base model recorded in the adapter (train writes the resolved path or Hub id there), once checked.

    The file may come from someone else and the name decides what is downloaded and loaded, so only a well-formed
    Hub id or an existing local folder is accepted, and the choice is logged.
    """
    config = Path(adapter_dir) / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{adapter_dir}: not an adapter folder (no adapter_config.json)")
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not _usable_base(base):
        raise AdapterError(f"{config}: base_model_name_or_path {base!r} is neither a Hub model id (NAME or "
                           "OWNER/NAME) nor an existing local folder; give the base with --base")
    log.info("base model %s (recorded in %s)", base, config)
    return base


def _usable_base(base) -> bool:
    # Not "": as a path it is the current folder.
    return isinstance(base, str) and base != "" and (Path(base).is_dir() or is_hub_id(base))


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_base(base: str, spec: JobSpec, device: str = "cpu"):
    """Tokenizer and base model as trained (4-bit when the spec says so), for inference."""
    return modeling.load_tokenizer(base, spec.model), modeling.load_model(base, spec, device, training=False)


def add_adapter(model, adapter_dir: str | Path, name: str):
    """Put the adapter on `model` under `name`; the first one wraps the base in a PeftModel."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=name)
    else:
        model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name)
    model.eval()
    return model


def merged(base_model, adapter_dir: str | Path):
    """The base with one adapter folded in: a dense model, faster to serve.

    The 4-bit weights are dequantized before the adapter goes on, so each merged weight is exactly what the
    4-bit forward computed with (dequantized W + BA) and greedy output matches the unmerged adapter up to
    float rounding.
    """
    if getattr(base_model, "is_quantized", False):
        base_model.dequantize()
    return add_adapter(base_model, adapter_dir, "default").merge_and_unload().eval()


def load(adapter_dir: str | Path, base: str | None = None, merge: bool = False, device: str = "cpu",
         trust_remote_code: bool = False) -> Loaded:
    spec = run_spec(adapter_dir, trust_remote_code)
    tokenizer, model = load_base(base or base_of(adapter_dir), spec, device)
    model = merged(model, adapter_dir) if merge else add_adapter(model, adapter_dir, "default")
    return Loaded(model, tokenizer, spec)


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def prompt_for(instruction: str, spec: JobSpec) -> str:
    return data.render_prompt(spec.prompt.inference_template, instruction)


def complete(model, tokenizer, prompts: list[str], settings: GenerationSpec, stops: list[list[str]] | None = None,
             limits: list[int] | None = None, streamer=None, rows: int | None = None,
             cache_len: int | None = None) -> list[Completion]:
    """Generate for a batch of rendered prompts (left padded) and decode only the new tokens.

    `limits` caps each prompt's new tokens below settings.max_new_tokens (one batch serves requests with
    different max_tokens); `stops` are per-prompt stop strings, cut after decoding. `rows` pads the batch to that
    many rows (copies of the last prompt, dropped afterwards) and `cache_len` decodes with a static KV cache of
    that length: together they keep a compiled decoder to a few shapes (see `static_cache_len`).
    """
    import torch

    batch_prompts = prompts + prompts[-1:] * ((rows or len(prompts)) - len(prompts))
    batch = tokenizer(batch_prompts, add_special_tokens=False, padding=True, padding_side="left",
                      return_tensors="pt")
    batch = batch.to(model.device)
    kwargs = decoding_kwargs(settings, tokenizer) | static_cache_kwargs(cache_len)
    with torch.inference_mode():
        output = model.generate(**batch, **kwargs, streamer=streamer)
    new = output[: len(prompts), batch["input_ids"].shape[1]:].tolist()
    prompt_lengths = batch["attention_mask"].sum(dim=1).tolist()
    limits = limits or [settings.max_new_tokens] * len(prompts)
    stops = stops or [[] for _ in prompts]
    return [finish(tokenizer, ids[:limit], length, stop)
            for ids, length, limit, stop in zip(new, prompt_lengths, limits, stops)]


def static_cache_len(model, spec: JobSpec) -> int | None:
    """The static KV cache length `model` decodes with under `spec`, or None for the dynamic cache.

    Only a dense (merged) model gets one: 4-bit layers and adapters switched per batch do not compile. The length
    covers the longest request the server accepts, so the cache, and with it the compiled graph, is built once.
    """
    from peft import PeftModel

    wanted = spec.generation.static_cache
    if wanted == "auto":
        wanted = model.device.type == "cuda"
    if not wanted or isinstance(model, PeftModel) or getattr(model, "is_quantized", False):
        return None
    return longest_request(spec)


def longest_request(spec: JobSpec) -> int:
    """Prompt and new tokens of the longest request a server accepts: the KV cache length that never grows."""
    return spec.serve.max_prompt_tokens + max(spec.serve.max_tokens_limit, spec.generation.max_new_tokens)


def static_cache_kwargs(cache_len: int | None) -> dict:
    if cache_len is None:
        return {}
    # Older transformers size the cache per call (the longest call so far): it then grows, and recompiles, once
    # per longer request instead of never.
    return {"cache_implementation": "static", **({"max_cache_len": cache_len} if _sizes_static_cache() else {})}


@functools.cache
def _sizes_static_cache() -> bool:
    """Whether this transformers takes `max_cache_len` (asked once: this runs for every batch a server decodes)."""
    from transformers import GenerationConfig

    return hasattr(GenerationConfig(), "max_cache_len")


def decoding_kwargs(settings: GenerationSpec, tokenizer) -> dict:
    kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                  repetition_penalty=settings.repetition_penalty,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    else:  # the model's generation_config may carry sampling values that greedy decoding would warn about
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def finish(tokenizer, ids: list[int], prompt_tokens: int, stop: list[str]) -> Completion:
    """A row's new token ids -> text up to EOS (and the first stop string), with its token count."""
    reason = "length"
    if tokenizer.eos_token_id in ids:  # rows that ended early are padded after their EOS
        ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
        reason = "stop"
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = first_stop(text, stop)
    if cut is not None:
        text, reason = text[:cut], "stop"
    return Completion(text, prompt_tokens, len(ids), reason)


def first_stop(text: str, stop: list[str]) -> int | None:
    found = [text.find(s) for s in stop if s and s in text]
    return min(found) if found else None


def generate(loaded: Loaded, instruction: str, settings: GenerationSpec | None = None) -> Completion:
    """The recipe's inference cell: one instruction, its inference prompt, the recipe's decoding."""
    settings = settings or loaded.spec.generation
    prompt = prompt_for(instruction, loaded.spec)
    cache_len = static_cache_len(loaded.model, dataclasses.replace(loaded.spec, generation=settings))
    return complete(loaded.model, loaded.tokenizer, [prompt], settings, cache_len=cache_len)[0]


def with_overrides(settings: GenerationSpec, **values) -> GenerationSpec:
    """Decoding settings with the given non-None values replaced (CLI flags, request fields)."""
    return dataclasses.replace(settings, **{k: v for k, v in values.items() if v is not None})

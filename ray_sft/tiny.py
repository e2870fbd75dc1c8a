"""An offline stand-in for the real base model: a small random-init Llama plus a tokenizer trained on local data.

Used by the quickstart and the tests (no weights can be downloaded here). A spec selects it with
`model.name_or_path: tiny`; it is built from the spec's local data file, deterministically, in a few seconds,
and cached under $RAY_SFT_CACHE (default ~/.cache/ray_sft) by a hash of the data and the settings below.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ray_sft.templates import INFERENCE_TEMPLATES, TRAIN_TEMPLATES

# A small vocabulary makes a Japanese sentence tens of tokens long, like a real tokenizer on a real model.
VOCAB_SIZE = 1024
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0)
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
BUILD_VERSION = "1"


def cache_root() -> Path:
    return Path(os.environ.get("RAY_SFT_CACHE", Path.home() / ".cache" / "ray_sft"))


def corpus(data_file: Path) -> list[str]:
    """Every text field of the data file plus the prompt templates."""
    from ray_sft.data import read_file

    texts = list(TRAIN_TEMPLATES.values()) + list(INFERENCE_TEMPLATES.values())
    for row in read_file(data_file):
        texts += [str(v) for v in row.values() if isinstance(v, str) and v]
    return texts


def cache_path(data_file: Path) -> Path:
    """Where the tiny model built on `data_file` is cached: one entry per data content and build recipe."""
    key = hashlib.sha256(data_file.read_bytes() + json.dumps([VOCAB_SIZE, MODEL_SHAPE, BUILD_VERSION]).encode())
    return cache_root() / f"tiny-llama-{key.hexdigest()[:12]}"


def ensure_tiny_model(data_source: str) -> Path:
    """Path of the tiny model built on `data_source` (a local file), building it if it is not cached yet."""
    data_file = Path(data_source)
    if not data_file.is_file():
        raise FileNotFoundError(f"model.name_or_path: tiny needs data.source to be a local file, got {data_source!r}")
    target = cache_path(data_file)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename into place: concurrent Ray workers may race to build the same model.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(corpus(data_file), staging)
        os.rename(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build(texts: list[str], out: Path) -> None:
    """Train the tokenizer on `texts`, create the seeded random model, save both in HF format to `out`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    # Byte-level: any input, whatever its script, is representable without <unk>.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKENS)
    tokenizer.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **MODEL_SHAPE)
    LlamaForCausalLM(config).save_pretrained(out)

"""The offline tiny model: deterministic build, a tokenizer that splits Japanese finely, caching, clear errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ray_sft import tiny

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "jobs" / "data" / "dolly-ja-mini.jsonl"


@pytest.fixture(scope="module")
def rows():
    return [json.loads(line) for line in BUNDLED.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from ray_sft.modeling import load_tokenizer
    from ray_sft.spec import ModelSpec

    return load_tokenizer(tiny_model_path, ModelSpec(name_or_path=tiny_model_path))


def test_build_is_deterministic(tmp_path, tiny_model_path):
    """A fresh build equals the session's cached model, which was built by ensure_tiny_model from the same data,
    usually in another process (workers on other machines build their own copy: they must all agree)."""
    from safetensors.torch import load_file

    cached, fresh = Path(tiny_model_path), tmp_path / "fresh"
    tiny.build(tiny.corpus(BUNDLED), fresh)
    stale = "if the cache predates a change to tiny.build, bump tiny.BUILD_VERSION"
    assert (fresh / "tokenizer.json").read_bytes() == (cached / "tokenizer.json").read_bytes(), stale
    assert (fresh / "config.json").read_bytes() == (cached / "config.json").read_bytes(), stale
    a, b = load_file(fresh / "model.safetensors"), load_file(cached / "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    assert all(a[k].equal(b[k]) for k in a), stale
    assert (fresh / "model.safetensors").read_bytes() == (cached / "model.safetensors").read_bytes()


def test_cached_model_is_llama_shaped(tiny_model_path, tokenizer):
    config = json.loads((Path(tiny_model_path) / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["vocab_size"] == len(tokenizer) <= tiny.VOCAB_SIZE
    assert config["tie_word_embeddings"] is False
    assert config["hidden_size"] == tiny.MODEL_SHAPE["hidden_size"]
    assert config["num_hidden_layers"] == tiny.MODEL_SHAPE["num_hidden_layers"]
    assert config["eos_token_id"] == tokenizer.eos_token_id
    assert config["pad_token_id"] == tokenizer.pad_token_id


def test_tokenizer_setup_matches_recipe(tokenizer):
    assert tokenizer.padding_side == "right"
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # the tiny tokenizer has its own <pad>
    # EOS is appended to the text by data.format_rows; the tokenizer must not add another.
    ids = tokenizer("質問です</s>", add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id


def test_load_tokenizer_matches_plain_fast_tokenizer(tiny_model_path, tokenizer, rows):
    """test_data tokenizes with PreTrainedTokenizerFast (no torch import); it must agree with load_tokenizer."""
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast.from_pretrained(tiny_model_path)
    text = rows[0]["instruction"] + rows[0]["response"] + "</s>"
    assert plain(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert plain.eos_token == tokenizer.eos_token


def test_tokenizer_splits_japanese_into_tens_of_tokens(tokenizer, rows):
    first = rows[0]
    assert first["instruction"] == "時間管理能力をあげるには?"
    sentence = first["response"].split("\n")[0]  # one Japanese sentence
    assert len(sentence) > 20
    assert len(tokenizer(sentence, add_special_tokens=False)["input_ids"]) >= 20
    per_row = sorted(len(tokenizer(r["instruction"] + "\n" + r["response"], add_special_tokens=False)["input_ids"])
                     for r in rows)
    assert per_row[len(per_row) // 2] >= 30  # a typical row is tens of tokens, not a handful
    assert per_row[0] >= 10


def test_tokenizer_round_trips(tokenizer, rows):
    samples = [rows[0]["response"], rows[1]["instruction"], "ＡＢＣ　全角と半角 abc 123!?\n\t改行", "未知の漢字：鬱麒麟 🍣"]
    for text in samples:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids  # byte-level: nothing is unknown
        assert tokenizer.decode(ids) == text


def test_ensure_tiny_model_caches(tmp_path, monkeypatch, rows):
    cache = tmp_path / "cache"
    monkeypatch.setenv("RAY_SFT_CACHE", str(cache))
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:40]), encoding="utf-8")
    built = tiny.ensure_tiny_model(str(data))
    assert built.parent == cache
    assert (built / "config.json").is_file() and (built / "tokenizer.json").is_file()
    assert (built / "model.safetensors").is_file()
    assert [p.name for p in cache.iterdir()] == [built.name]  # no staging folder left behind
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    start = time.monotonic()
    again = tiny.ensure_tiny_model(str(data))
    assert time.monotonic() - start < 1.0
    assert again == built
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt


def test_cache_entry_follows_the_data_content_and_the_build_recipe(tmp_path, monkeypatch, rows):
    """One cached model per data content and build recipe (checked without building: a finished entry is faked)."""
    monkeypatch.setenv("RAY_SFT_CACHE", str(tmp_path / "cache"))

    def data_file(name: str, subset) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in subset), encoding="utf-8")
        return path

    first, copy, other = data_file("a.jsonl", rows[:5]), data_file("b.jsonl", rows[:5]), data_file("c.jsonl", rows[5:10])
    assert tiny.cache_path(first) == tiny.cache_path(copy)  # the content decides, not the file's name
    assert tiny.cache_path(first) != tiny.cache_path(other)
    entry = tiny.cache_path(first)
    monkeypatch.setattr(tiny, "BUILD_VERSION", f"{tiny.BUILD_VERSION}-next")
    assert tiny.cache_path(first) != entry  # a new build recipe never reuses an old model
    monkeypatch.undo()
    monkeypatch.setenv("RAY_SFT_CACHE", str(tmp_path / "cache"))
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")
    assert tiny.ensure_tiny_model(str(copy)) == entry


@pytest.mark.parametrize("source", ["llm-jp/databricks-dolly-15k-ja", "no/such/file.jsonl"])
def test_non_local_data_source_is_a_clear_error(tmp_path, monkeypatch, source):
    monkeypatch.setenv("RAY_SFT_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        tiny.ensure_tiny_model(source)
    assert "model.name_or_path: tiny needs data.source to be a local file" in str(info.value)
    assert repr(source) in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing built


def test_tiny_spec_with_hub_data_is_a_clear_error(tmp_path, monkeypatch):
    from ray_sft import modeling, spec

    monkeypatch.setenv("RAY_SFT_CACHE", str(tmp_path))
    job = spec.from_dict({"model": {"name_or_path": "tiny"}})  # data.source stays the Hub dataset
    with pytest.raises(FileNotFoundError, match="tiny needs data.source to be a local file"):
        modeling.resolve_model_path(job)

"""`ray_sft.generate`: the recipe's inference cell, batching that keeps greedy text, merged serving, the CLI verb."""

from __future__ import annotations

import pytest
import torch

from ray_sft import cli, generate
from tests.adapters import random_adapter
from tests.conftest import quick_spec

PROMPTS = ["時間管理能力をあげるには?", "猫", "日本で一番高い山はどこですか? 理由も説明してください。", "水"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_path):
    out = tmp_path_factory.mktemp("run")
    return random_adapter(quick_spec(out), tiny_model_path, out, seed=1)


@pytest.fixture(scope="module")
def loaded(adapter):
    return generate.load(adapter)


def test_settings_and_base_come_from_the_run(adapter, loaded, tiny_model_path):
    assert generate.base_of(adapter) == tiny_model_path
    assert loaded.spec.quantization.compute_dtype == "float32"  # the quickstart's, not the default bfloat16
    assert (loaded.spec.generation.max_new_tokens, loaded.spec.generation.repetition_penalty) == (100, 1.2)
    assert not loaded.spec.generation.do_sample


def test_generate_is_the_recipe_inference_cell(loaded):
    """Written out as the notebook does it: template, no special tokens, greedy, penalty 1.2, new tokens only."""
    tokenizer, model = loaded.tokenizer, loaded.model
    prompt = f"\n### 指示\n{PROMPTS[0]}\n### 回答:\n"
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=100, do_sample=False, repetition_penalty=1.2,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)

    result = generate.generate(loaded, PROMPTS[0])
    assert result.text == expected and result.text
    assert result.prompt_tokens == ids["input_ids"].shape[1]
    assert result.completion_tokens == len(out[0]) - ids["input_ids"].shape[1]


def test_batch_generation_equals_one_by_one(loaded):
    prompts = [generate.prompt_for(p, loaded.spec) for p in PROMPTS]
    lengths = {len(loaded.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts}
    assert len(lengths) > 2  # the batch really needs (left) padding
    settings = generate.with_overrides(loaded.spec.generation, max_new_tokens=40)
    batch = generate.complete(loaded.model, loaded.tokenizer, prompts, settings)
    alone = [generate.complete(loaded.model, loaded.tokenizer, [p], settings)[0] for p in prompts]
    assert batch == alone


def test_limits_and_stops_cut_each_row(loaded):
    prompts = [generate.prompt_for(p, loaded.spec) for p in PROMPTS[:2]]
    settings = generate.with_overrides(loaded.spec.generation, max_new_tokens=30)
    full = generate.complete(loaded.model, loaded.tokenizer, prompts, settings)
    stop = full[1].text[5:8]
    cut = generate.complete(loaded.model, loaded.tokenizer, prompts, settings, stops=[[], [stop]], limits=[7, 30])
    assert (cut[0].completion_tokens, cut[0].finish_reason) == (7, "length")
    assert full[0].text.startswith(cut[0].text) and len(cut[0].text) < len(full[0].text)
    assert cut[1].text == full[1].text[: full[1].text.index(stop)] and cut[1].finish_reason == "stop"


def test_merged_model_gives_the_same_greedy_output(adapter, loaded):
    merged = generate.load(adapter, merge=True)
    assert not hasattr(merged.model, "peft_config") and not getattr(merged.model, "is_quantized", False)
    ids = loaded.tokenizer(generate.prompt_for(PROMPTS[0], loaded.spec), add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(merged.model(**ids).logits, loaded.model(**ids).logits, atol=1e-4, rtol=1e-4)
    assert [generate.generate(merged, p).text for p in PROMPTS[:2]] == [generate.generate(loaded, p).text
                                                                         for p in PROMPTS[:2]]


def test_static_cache_batch_with_padding_rows_equals_dynamic_one_by_one(adapter, loaded):
    """What a merged serve replica runs: a static KV cache sized for the longest request, the batch padded up to
    a compiled size; the text must be what the dynamic cache gives each prompt alone."""
    from transformers import StaticCache

    merged = generate.load(adapter, merge=True)
    assert generate.static_cache_len(merged.model, merged.spec) is None  # "auto": CUDA only
    merged.spec.generation.static_cache = True
    cache_len = generate.static_cache_len(merged.model, merged.spec)
    assert cache_len == merged.spec.serve.max_prompt_tokens + merged.spec.serve.max_tokens_limit
    assert generate.static_cache_len(loaded.model, merged.spec) is None  # 4-bit + adapters: dynamic cache
    caches = []
    hook = merged.model.register_forward_pre_hook(
        lambda module, args, kwargs: caches.append(type(kwargs.get("past_key_values") or kwargs.get("cache"))),
        with_kwargs=True)
    prompts = [generate.prompt_for(p, merged.spec) for p in PROMPTS[:3]]
    settings = generate.with_overrides(merged.spec.generation, max_new_tokens=40)
    try:
        static = generate.complete(merged.model, merged.tokenizer, prompts, settings, rows=4, cache_len=cache_len)
    finally:
        hook.remove()
    assert caches and set(caches) == {StaticCache}
    dynamic = [generate.complete(merged.model, merged.tokenizer, [p], settings)[0] for p in prompts]
    assert len(static) == 3 and static == dynamic


def test_adapter_changes_the_output(loaded, tiny_model_path):
    tokenizer, base = generate.load_base(tiny_model_path, loaded.spec)
    prompt = generate.prompt_for(PROMPTS[0], loaded.spec)
    assert generate.complete(base, tokenizer, [prompt], loaded.spec.generation)[0].text != \
        generate.generate(loaded, PROMPTS[0]).text


def test_run_spec_is_found_for_a_tune_winner_and_defaults_elsewhere(adapter, tmp_path):
    nested = tmp_path / "run" / "best" / "adapter"
    nested.mkdir(parents=True)
    (tmp_path / "run" / "spec.yaml").write_text((adapter.parent / "spec.yaml").read_text())
    assert generate.run_spec(nested).quantization.compute_dtype == "float32"
    assert generate.run_spec(tmp_path).quantization.compute_dtype == "bfloat16"
    with pytest.raises(FileNotFoundError, match="not an adapter folder"):
        generate.base_of(tmp_path)


def test_cli_generate_prints_the_completion_with_flag_overrides(adapter, loaded, capsys):
    assert cli.main(["generate", "--adapter", str(adapter), "--max-new-tokens", "12", PROMPTS[1]]) == 0
    expected = generate.generate(loaded, PROMPTS[1], generate.with_overrides(loaded.spec.generation,
                                                                              max_new_tokens=12))
    assert capsys.readouterr().out == expected.text + "\n"


REMOTE_CODE = '''
from pathlib import Path

from transformers import LlamaForCausalLM

Path(MARKER).touch()  # proof that this file was imported


class Remote(LlamaForCausalLM):
    pass
'''


def _hostile_adapter(adapter, tiny_model_path, root, base: str | None = None):
    """A copy of `adapter` whose run spec turns remote code on, on a base that ships its own model code."""
    import json
    import shutil

    import yaml

    remote_base = root / "base"
    shutil.copytree(tiny_model_path, remote_base)
    config = json.loads((remote_base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "remote.Remote"}
    (remote_base / "config.json").write_text(json.dumps(config))
    # transformers imports a copy of the file from its own modules cache: the marker's path is absolute.
    (remote_base / "remote.py").write_text(REMOTE_CODE.replace("MARKER", repr(str(root / "RAN"))))
    hostile = root / "run" / "adapter"
    shutil.copytree(adapter, hostile)
    run_spec = yaml.safe_load((adapter.parent / "spec.yaml").read_text())
    run_spec["model"]["trust_remote_code"] = True
    (hostile.parent / "spec.yaml").write_text(yaml.safe_dump(run_spec))
    recorded = json.loads((hostile / "adapter_config.json").read_text())
    recorded["base_model_name_or_path"] = str(remote_base) if base is None else base
    (hostile / "adapter_config.json").write_text(json.dumps(recorded))
    return hostile


def test_an_adapter_folder_cannot_turn_on_remote_code(adapter, tiny_model_path, tmp_path):
    from ray_sft import targets

    hostile = _hostile_adapter(adapter, tiny_model_path, tmp_path)
    loaded = generate.load(hostile)
    assert not loaded.spec.model.trust_remote_code and not (tmp_path / "RAN").exists()
    assert not targets.load(None, [], [f"a={hostile}"], None)[0].model.trust_remote_code
    # Only the user turns it on (a serve override, generate's flag), and then the base's code does run: the
    # check above could have failed.
    assert targets.load(None, ["model.trust_remote_code=true"], [f"a={hostile}"], None)[0].model.trust_remote_code
    generate.load(hostile, trust_remote_code=True)
    assert (tmp_path / "RAN").exists()


@pytest.mark.parametrize("recorded", ["/no/such/base", "../no-such-base", "owner/name/extra", "a--b", ""])
def test_a_malformed_recorded_base_is_refused(adapter, tiny_model_path, tmp_path, capsys, recorded):
    hostile = _hostile_adapter(adapter, tiny_model_path, tmp_path, base=recorded)
    with pytest.raises(generate.AdapterError, match="base_model_name_or_path"):
        generate.base_of(hostile)
    assert cli.main(["generate", "--adapter", str(hostile), "hi"]) == 2
    assert "neither a Hub model id" in capsys.readouterr().err

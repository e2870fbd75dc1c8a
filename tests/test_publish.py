"""push --dry-run stages exactly the upload; export --merge gives a plain transformers model that generates what
base + adapter generates; check names what other servers refuse. Real files, real models; no Hub (dry run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from ray_sft import cli, generate, modeling, publish, run_files
from ray_sft.spec import GenerationSpec, with_values
from tests.conftest import BUNDLED_DATA, quick_spec

PROMPT = "時間管理能力をあげるには?"
GREEDY = GenerationSpec(max_new_tokens=24, do_sample=False, repetition_penalty=1.2)


def test_push_dry_run_writes_and_lists_exactly_the_upload(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)  # a dry run needs no token
    out = tmp_path / "upload"
    adapter = trained_run.adapter_dir
    assert cli.main(["push", "--adapter", str(adapter), "--repo", "me/tiny-ja", "--dry-run", str(out)]) == 0
    listed = capsys.readouterr().out.splitlines()[1:]
    written = sorted(p.name for p in out.iterdir())
    expected = sorted({"README.md", *run_files.ADAPTER_FILES,
                       *(n for n in run_files.TOKENIZER_FILES if (adapter / n).is_file())})
    assert listed == written == expected
    assert (out / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "peft" and metadata["license"] and metadata["language"] == ["ja"]
    assert "base_model" not in metadata  # the tiny base is local: the Hub refuses a base_model it does not have
    assert "PeftModel.from_pretrained(base, 'me/tiny-ja')" in card  # the usage snippet names the repo
    assert "`dolly-ja-mini.jsonl`" in card  # the data by file name
    for local in (str(trained_run.run_dir), str(Path.home()), generate.base_of(adapter), str(BUNDLED_DATA)):
        assert local not in card


def test_the_card_names_a_hub_base_and_hub_data_by_id(tmp_path):
    spec = with_values(quick_spec(tmp_path), {"model.name_or_path": "llm-jp/llm-jp-3-1.8b",
                                              "data.source": "llm-jp/databricks-dolly-15k-ja"})
    card = run_files.model_card(spec, "llm-jp/llm-jp-3-1.8b", {"loss": 1.5})
    assert yaml.safe_load(card.split("---")[1])["base_model"] == "llm-jp/llm-jp-3-1.8b"
    assert "`llm-jp/databricks-dolly-15k-ja`" in card and str(tmp_path) not in card
    assert "AutoModelForCausalLM.from_pretrained('llm-jp/llm-jp-3-1.8b')" in card


class FakeHub:
    """The few HfApi calls push makes, on one existing repo (no network)."""

    def __init__(self, private: bool, may_change: bool = True):
        self.private, self.may_change, self.calls = private, may_change, []

    def create_repo(self, repo, private, exist_ok):
        self.calls.append("create_repo")  # exist_ok: an existing repo keeps its visibility, as on the Hub
        return f"https://hub.example/{repo}"

    def repo_info(self, repo):
        return type("Info", (), {"private": self.private})()

    def update_repo_settings(self, repo, private):
        import httpx
        from huggingface_hub.errors import HfHubHTTPError

        if not self.may_change:
            raise HfHubHTTPError("403 Forbidden", response=httpx.Response(
                403, request=httpx.Request("PUT", f"https://hub.example/api/models/{repo}/settings")))
        self.calls.append(f"private={private}")
        self.private = private

    def upload_folder(self, repo_id, folder_path, commit_message):
        self.calls.append(f"upload private={self.private}")


@pytest.mark.parametrize("wanted", [True, False])
def test_push_makes_an_existing_repo_what_was_asked_before_uploading(trained_run, wanted):
    hub = FakeHub(private=not wanted)
    publish.push(trained_run.adapter_dir, "me/tiny-ja", private=wanted, api=hub)
    assert hub.calls == ["create_repo", f"private={wanted}", f"upload private={wanted}"]
    hub = FakeHub(private=wanted)
    publish.push(trained_run.adapter_dir, "me/tiny-ja", private=wanted, api=hub)
    assert hub.calls == ["create_repo", f"upload private={wanted}"]


def test_push_refuses_a_public_repo_it_cannot_make_private(trained_run):
    hub = FakeHub(private=False, may_change=False)
    with pytest.raises(publish.PublishError, match="exists and is not private.*nothing was uploaded"):
        publish.push(trained_run.adapter_dir, "me/tiny-ja", private=True, api=hub)
    assert hub.calls == ["create_repo"]


def test_push_without_token_is_a_clear_error(trained_run, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert cli.main(["push", "--adapter", str(trained_run.adapter_dir), "--repo", "me/tiny-ja"]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err


def test_push_refuses_a_folder_that_is_not_an_adapter(tmp_path, capsys):
    assert cli.main(["push", "--adapter", str(tmp_path), "--repo", "me/x", "--dry-run", str(tmp_path / "o")]) == 2
    assert "not an adapter folder" in capsys.readouterr().err


def _complete(model, tokenizer, spec) -> tuple[str, "object"]:
    import torch

    prompt = generate.prompt_for(PROMPT, spec)
    text = generate.complete(model, tokenizer, [prompt], GREEDY)[0].text
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**ids).logits
    return text, logits


def test_export_merge_loads_with_plain_transformers_and_matches_base_plus_adapter(trained_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = trained_run.adapter_dir
    spec, base = generate.run_spec(adapter), generate.base_of(adapter)
    out = publish.export_merged(adapter, tmp_path / "merged", dtype="float32")
    assert not (out / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft, no bitsandbytes
    merged_text, merged_logits = _complete(merged, AutoTokenizer.from_pretrained(out), spec)

    tokenizer = modeling.load_tokenizer(base, spec.model)
    plain_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    base_text, base_logits = _complete(plain_base, tokenizer, spec)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                             str(adapter)).eval()
    adapter_text, adapter_logits = _complete(with_adapter, tokenizer, spec)

    assert merged_text == adapter_text
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)
    # The adapter changed the model, so the comparison above could have failed.
    assert (base_logits - adapter_logits).abs().max() > 1e-3


def test_export_cli_saves_bf16_by_default_and_reports_the_check(trained_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli.main(["export", "--adapter", str(trained_run.adapter_dir), "--merge", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "check: modules_to_save=['embed_tokens']" in printed  # the quickstart trains an embedding copy
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_check_names_each_feature_servers_reject(trained_run, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run.adapter_dir, adapter)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())

    config.update(modules_to_save=None, r=8, bias="none", use_dora=False)
    config_path.write_text(json.dumps(config))
    assert publish.check(adapter) == []
    assert cli.main(["export", "--adapter", str(adapter)]) == 0

    config.update(modules_to_save=["embed_tokens"], r=64, target_modules=["q_proj", "lm_head"], use_dora=True)
    config_path.write_text(json.dumps(config))
    features = [p.feature for p in publish.check(adapter)]
    assert features == ["modules_to_save=['embed_tokens']", "target_modules includes ['lm_head']", "r=64",
                        "use_dora=true"]
    assert publish.check(adapter, max_rank=64)[-1].feature == "use_dora=true"
    capsys.readouterr()
    assert cli.main(["export", "--adapter", str(adapter)]) == 1
    assert "r=64" in capsys.readouterr().out

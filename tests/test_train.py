"""QLoRA SFT: the single-process trainer, and real 2-worker Ray Train runs (shards, DDP, checkpoints, crashes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ray_sft import data, modeling, run_files, train
from tests.conftest import FAST, quick_spec


def test_single_process_sft_with_neftune_lowers_eval_loss(tmp_path, tiny_model_path):
    job = quick_spec(tmp_path, "training.max_steps=8", "training.gradient_accumulation_steps=1",
                     "data.max_rows=80", "data.eval_rows=16")
    assert job.training.neftune_noise_alpha == 5
    tokenizer = modeling.load_tokenizer(tiny_model_path, job.model)
    examples = data.load_examples(job, tokenizer)
    trainer = train.build_trainer(job, tiny_model_path, tokenizer, examples.train, examples.eval, "cpu",
                                  str(tmp_path / "out"))
    assert trainer.args.neftune_noise_alpha == 5
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert trainer.state.global_step == 8
    assert after < before - 0.01


def test_sft_config_maps_the_recipe(tmp_path):
    from ray_sft import spec

    job = spec.load(Path(__file__).parents[1] / "jobs" / "llm-jp-3-1.8b-dolly-ja.yaml", [f"output.dir={tmp_path}"])
    config = train.sft_config(job, str(tmp_path), "cpu", has_eval=False)
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (4, 16)
    assert (config.learning_rate, config.lr_scheduler_type.value, config.warmup_steps) == (2e-4, "cosine", 100)
    assert (config.optim.value, config.weight_decay, config.num_train_epochs) == ("adamw_torch_fused", 0.01, 3)
    assert (config.max_length, config.packing, config.neftune_noise_alpha) == (1024, False, 5)
    assert config.train_sampling_strategy == "group_by_length"
    assert (config.logging_steps, config.save_steps, config.save_total_limit) == (20, 20, 3)
    assert config.bf16 and config.auto_find_batch_size and config.gradient_checkpointing


# ---------------------------------------------------------------------------------------------------------------
# Real Ray Train runs


def _audits(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / train.SHARDS_DIR).glob("rank-*.json"))]


def test_two_workers_train_each_row_once_and_stay_in_sync(trained_run, tiny_model_path):
    job = run_files_spec(trained_run.run_dir)
    tokenizer = modeling.load_tokenizer(tiny_model_path, job.model)
    expected_rows = sorted(e["row"] for e in data.load_examples(job, tokenizer).train)
    audits = _audits(trained_run.run_dir)
    assert len(audits) == 2
    assigned = [set(a["assigned"]) for a in audits]
    assert not assigned[0] & assigned[1]
    assert sorted(assigned[0] | assigned[1]) == expected_rows
    for audit in audits:  # each rank trained its whole shard, each row once (not half: no double sharding)
        first_epoch = audit["trained_per_epoch"][0]
        assert sorted(first_epoch) == sorted(audit["assigned"])
    assert audits[0]["trainable_sha256"] == audits[1]["trainable_sha256"]


def run_files_spec(run_dir: Path):
    from ray_sft import spec

    return spec.from_dict(__import__("yaml").safe_load((run_dir / "spec.yaml").read_text()))


def test_metrics_plot_and_loss_decrease(trained_run):
    rows = run_files.read_metrics(trained_run.run_dir)
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == [1, 2, 3, 4]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]
    assert all(r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    assert all({"learning_rate", "epoch"} <= r.keys() for r in rows if "loss" in r)
    assert [r["step"] for r in rows if "checkpoint" in r] == [2, 4]
    assert trained_run.metrics["step"] == 4
    plot = trained_run.run_dir / "loss.png"
    assert plot.is_file() and plot.read_bytes()[:4] == b"\x89PNG"


def test_exported_adapter_loads_with_plain_peft_from_any_directory(trained_run, tmp_path, monkeypatch):
    from peft import PeftModel

    adapter = trained_run.adapter_dir
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= names
    card = (adapter / "README.md").read_text()
    assert "dolly-ja-mini.jsonl" in card and "eval_loss" in card and "name_or_path: tiny" in card
    config = json.loads((adapter / "adapter_config.json").read_text())
    monkeypatch.chdir(tmp_path)
    job = run_files_spec(trained_run.run_dir)
    base = modeling.load_model(config["base_model_name_or_path"], job, "cpu", training=False)
    model = PeftModel.from_pretrained(base, str(adapter))
    assert "embed_tokens" in str(config["modules_to_save"])
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 14


def test_no_secrets_in_run_files(trained_run, monkeypatch):
    secret = os.environ.get("HF_TOKEN", "hf_" + "x" * 30)
    for path in trained_run.run_dir.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".jsonl", ".yaml", ".md"}:
            assert secret not in path.read_text(errors="ignore")


def test_worker_crash_recovers_from_latest_checkpoint(ray_cluster, tmp_path):
    job = quick_spec(tmp_path, *FAST, "scaling.max_failures=1", "scaling.crash={rank: 1, step: 3}")
    outcome = train.fit(job)
    assert (outcome.run_dir / train.CRASH_MARKER).read_text().startswith("rank 1 exited at step 3")
    assert outcome.metrics["step"] == 4
    steps = [r["step"] for r in run_files.read_metrics(outcome.run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # the crash at step 3 came before its report; restored at step 2


def test_crash_without_retries_fails_keeps_checkpoints_and_resume_continues(ray_cluster, tmp_path):
    job = quick_spec(tmp_path, *FAST, "scaling.max_failures=0", "scaling.crash={rank: 0, step: 3}")
    with pytest.raises(train.TrainError, match="training failed.*--resume"):
        train.fit(job)
    checkpoints = sorted(Path(job.storage_path).glob("*/checkpoint_*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "adapter_model.safetensors").is_file()
    assert json.loads((checkpoints[0] / "trainer_state.json").read_text())["global_step"] == 2

    outcome = train.fit(job, resume=True)
    assert outcome.metrics["step"] == 4
    steps = [r["step"] for r in run_files.read_metrics(outcome.run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # resumed after step 2, not restarted at 1
    assert (outcome.adapter_dir / "adapter_model.safetensors").is_file()


def test_more_workers_than_the_cluster_has_fails_fast(ray_cluster, tmp_path):
    job = quick_spec(tmp_path, *FAST, "scaling.num_workers=3")
    with pytest.raises(train.TrainError, match=r"3 worker\(s\) x 1 CPU = 3 CPU needed.*has 2 CPU"):
        train.fit(job)
    gpu_job = quick_spec(tmp_path, *FAST, "scaling.use_gpu=true")
    with pytest.raises(train.TrainError, match="GPU"):
        train.fit(gpu_job)

"""QLoRA SFT: the single-process trainer, and real 2-worker Ray Train runs (shards, DDP, checkpoints, crashes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_sft import data, execution, modeling, run_files, train
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


def test_planted_secrets_appear_in_no_run_file_log_or_checkpoint(trained_run):
    """conftest plants fake HF_TOKEN/WANDB_API_KEY values before the shared run; no byte of them may be written."""
    import ray

    from tests.conftest import PLANTED_SECRETS

    session_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    folders = [trained_run.run_dir, Path(trained_run.checkpoint_path).parent, session_logs]
    searched = 0
    for folder in folders:
        for path in (p for p in folder.rglob("*") if p.is_file()):
            content = path.read_bytes()
            searched += 1
            for secret in PLANTED_SECRETS.values():
                assert secret.encode() not in content, path
    assert searched > 20 and any(session_logs.glob("worker-*"))  # the logs and checkpoints really were read


def test_every_training_process_disabled_the_cpu_repack_on_every_4bit_layer(trained_run):
    for audit in _audits(trained_run.run_dir):
        fixed, layers = audit["cpu_repack_disabled"]
        assert layers > 0 and fixed == layers


@pytest.mark.slow
def test_worker_crash_recovers_from_latest_checkpoint(ray_cluster, tmp_path):
    job = quick_spec(tmp_path, *FAST, "scaling.max_failures=1")
    outcome = train.fit(job, crash=train.InjectedCrash(rank=1, step=3))
    assert (outcome.run_dir / train.CRASH_MARKER).read_text().startswith("rank 1 exited at step 3")
    assert outcome.metrics["step"] == 4
    steps = [r["step"] for r in run_files.read_metrics(outcome.run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # the crash at step 3 came before its report; restored at step 2


@pytest.mark.slow
def test_crash_without_retries_fails_keeps_checkpoints_and_resume_continues(ray_cluster, tmp_path):
    # One worker: what fails and resumes here is the run, not a worker group (the test above restarts one of two).
    # On the dequantized base, as the fast spec trains: the resumed worker loads the 4-bit base and dequantizes it
    # again.
    job = quick_spec(tmp_path, *FAST, "scaling.max_failures=0", "scaling.num_workers=1",
                     "training.dequantize_base=true")
    with pytest.raises(train.TrainError, match="(?s)training failed.*--resume"):
        train.fit(job, crash=train.InjectedCrash(rank=0, step=3))
    checkpoints = [p for p in sorted(Path(job.storage_path).glob("*/checkpoint_*")) if p.is_dir()]
    assert len(checkpoints) == 1 and (checkpoints[0] / "adapter_model.safetensors").is_file()
    assert json.loads((checkpoints[0] / "trainer_state.json").read_text())["global_step"] == 2

    outcome = train.fit(job, resume=True)
    assert outcome.metrics["step"] == 4
    steps = [r["step"] for r in run_files.read_metrics(outcome.run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # resumed after step 2, not restarted at 1
    assert (outcome.adapter_dir / "adapter_model.safetensors").is_file()
    assert [audit["cpu_repack_disabled"] for audit in _audits(outcome.run_dir)] == [[0, 0]]  # no 4-bit layer left


def test_more_workers_than_the_cluster_has_fails_fast(ray_cluster, tmp_path):
    job = quick_spec(tmp_path, *FAST, "scaling.num_workers=3")
    with pytest.raises(train.TrainError, match=r"3 worker\(s\) x 1 CPU = 3 CPU needed.*has 2 CPU"):
        train.fit(job)
    gpu_job = quick_spec(tmp_path, *FAST, "scaling.use_gpu=true")
    with pytest.raises(train.TrainError, match="GPU"):
        train.fit(gpu_job)


# ---------------------------------------------------------------------------------------------------------------
# Fast execution settings: the same step computed another way


def _step_loss(tmp_path, tiny_model_path, *overrides):
    """Loss and token count of the first optimizer step's rows through one forward pass (no dropout, no noise)."""
    import torch

    job = quick_spec(tmp_path, "data.max_rows=40", "data.eval_rows=0", "training.neftune_noise_alpha=null",
                     "training.per_device_batch_size=4", "training.gradient_accumulation_steps=4", *overrides)
    tokenizer = modeling.load_tokenizer(tiny_model_path, job.model)
    rows = data.load_examples(job, tokenizer).train
    trainer = train.build_trainer(job, tiny_model_path, tokenizer, rows, [], "cpu", str(tmp_path / "out"))
    loader = trainer.get_train_dataloader()
    micro, accumulation = execution.micro_batching(job)
    batches = [trainer._prepare_inputs(b) for b, _ in zip(loader, range(accumulation))]
    count = trainer._get_num_items_in_batch(batches, trainer.args.device)
    trainer.model.eval()
    with torch.no_grad():
        loss = sum(trainer.compute_loss(trainer.model, dict(b), num_items_in_batch=count) for b in batches)
    return float(loss), int(count), batches


def test_padding_free_one_pass_gives_the_recipes_step_loss(tmp_path, tiny_model_path):
    padded, padded_count, padded_batches = _step_loss(tmp_path / "a", tiny_model_path, "training.padding_free=false",
                                                      "training.micro_batch_size=4")
    packed, packed_count, packed_batches = _step_loss(tmp_path / "b", tiny_model_path, "training.padding_free=true",
                                                      "training.micro_batch_size=16")
    assert len(padded_batches) == 4 and len(packed_batches) == 1
    # The same 16 rows, in the same order, padded in 4 batches vs concatenated in one row without pad tokens.
    real = [ids[mask.bool()] for b in padded_batches for ids, mask in zip(b["input_ids"], b["attention_mask"])]
    assert torch_equal(packed_batches[0]["input_ids"][0], real)
    assert padded_batches[0]["attention_mask"].eq(0).any()  # the padded path really had padding to ignore
    assert packed_count == padded_count  # same loss normalisation: the step's target tokens
    assert abs(packed - padded) < 1e-5 * abs(padded)


def torch_equal(packed, rows) -> bool:
    import torch

    return torch.equal(packed, torch.cat(rows))


def test_recipe_neftune_noise_scale_survives_padding_free():
    """Each token gets alpha / sqrt(L * d) with L its recipe batch's padded length, however the rows are batched."""
    import torch

    lengths = [5, 3, 7, 2, 4, 4]  # two recipe batches of 3 rows: padded to 7, then to 4
    neftune = execution.RecipeNeftune(alpha=5.0, group_rows=3)
    neftune.batch = {"attention_mask": torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])}
    padded = neftune.magnitude(torch.zeros(6, 7, 8)).expand(6, 7, 1)  # one scale per padded row
    neftune.batch = {"attention_mask": None, "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    packed = neftune.magnitude(torch.zeros(1, sum(lengths), 8))
    expected = torch.tensor([5 / (7 * 8) ** 0.5] * 15 + [5 / (4 * 8) ** 0.5] * 10)
    assert torch.allclose(packed.flatten(), expected)
    assert torch.allclose(torch.cat([padded[i, :n, 0] for i, n in enumerate(lengths)]), expected)

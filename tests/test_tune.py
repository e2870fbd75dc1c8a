"""ray-sft tune: search-space checks, the per-trial resource rule, and real searches on a local Ray cluster."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from ray_sft import run_files, spec, tune
from ray_sft.cli import main
from ray_sft.spec import SpecError

from tests.conftest import ABSURD_LR, FAST, REPO

QUICKSTART_TUNE = REPO / "jobs" / "quickstart-tune.yaml"


def tune_spec(tmp_path: Path, *overrides: str):
    return spec.load(QUICKSTART_TUNE, [f"output.dir={tmp_path}", *FAST, *overrides])


# ---------------------------------------------------------------------------------------------------------------
# Spec errors, before any trial


@pytest.mark.parametrize("override, expected", [
    ("tune.search_space.lora.rank={choice: [4, 8]}", "tune.search_space.lora.rank: not a searchable spec field"),
    ("tune.search_space.tune.num_samples={choice: [1]}", "tune.search_space.tune.num_samples: not a searchable"),
    ("tune.search_space.lora.r={normal: [8, 2]}", "tune.search_space.lora.r: must be one of"),
    ("tune.search_space.lora.r={choice: []}", "tune.search_space.lora.r.choice: needs values"),
    ("tune.search_space.lora.dropout={uniform: [0.2, 0.1]}", "low < high"),
    ("tune.search_space.training.learning_rate={loguniform: [0, 0.1]}", "bounds must be > 0"),
    ("tune.search_space.lora.r={uniform: [4, 16]}", "value 10.0 gives lora.r: 10.0 is not a valid int"),
    ("tune.search_space.lora.dropout={grid: [0.1, 1.5]}", "value 1.5 gives lora.dropout: must be in [0, 1)"),
])
def test_bad_search_space_is_a_spec_error(tmp_path, override, expected):
    with pytest.raises(SpecError) as caught:
        tune_spec(tmp_path, override)
    assert any(expected in e for e in caught.value.errors), caught.value.errors


def test_cli_exits_2_on_a_bad_search_space_before_any_trial(tmp_path, capsys):
    # An unreachable address: reaching Ray at all would fail differently, so exit 2 proves the check came first.
    code = main(["tune", str(QUICKSTART_TUNE), f"output.dir={tmp_path}", "tune.search_space.lora.nope={grid: [1]}",
                 "tune.search_space.lora.alpha={sample: [1, 2]}", "--address", "ray://127.0.0.1:1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "lora.nope: not a searchable spec field" in err and "lora.alpha: must be one of" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("override, expected", [
    ("tune.search_space={}", "tune.search_space: empty"),
    ("tune.scheduler.type=pbt", "tune.scheduler.type: pbt is not supported"),
    ("data.eval_rows=0", "tune.metric: eval_loss needs an eval split"),
    ("tune.cpus_per_trial=0.01", "tune.cpus_per_trial: must exceed"),
])
def test_tune_only_rules_are_spec_errors(tmp_path, override, expected):
    with pytest.raises(SpecError) as caught:
        tune.check(tune_spec(tmp_path, override))
    assert any(expected in e for e in caught.value.errors), caught.value.errors


@pytest.mark.skipif(importlib.util.find_spec("optuna") is not None, reason="optuna is installed here")
def test_optuna_asked_but_not_installed_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="optuna is not installed"):
        tune.check(tune_spec(tmp_path, "tune.search_alg=optuna"))


# ---------------------------------------------------------------------------------------------------------------
# The per-trial resource rule


def test_two_cpus_two_at_a_time_gives_each_worker_099_cpu_and_one_thread(tmp_path):
    job = tune_spec(tmp_path)
    share = tune.trial_share(job, {"CPU": 2.0})
    assert (share.cpus, share.gpus, share.use_gpu, share.concurrent) == (1.0, 0, False, 2)
    trial = tune.trial_spec(job, {"lora.r": 4}, "t1", tmp_path, share)
    assert trial.scaling.cpus_per_worker == pytest.approx(0.99) and trial.lora.r == 4
    assert trial.run_dir == tmp_path / "trials" / "t1"


def test_quarter_gpu_per_trial_packs_four_trials_on_one_gpu(tmp_path):
    job = tune_spec(tmp_path, "scaling.use_gpu=auto", "tune.gpus_per_trial=0.25", "tune.max_concurrent_trials=null")
    share = tune.trial_share(job, {"CPU": 16.0, "GPU": 1.0})
    assert (share.gpus, share.concurrent) == (0.25, 4)
    trial = tune.trial_spec(job, {"scaling.num_workers": 2}, "t1", tmp_path, share)
    assert trial.scaling.gpus_per_worker == 0.125 and trial.scaling.use_gpu is True


def test_default_share_is_one_plain_run_and_as_many_as_fit(tmp_path):
    job = tune_spec(tmp_path, "tune.max_concurrent_trials=null", "scaling.num_workers=2")
    share = tune.trial_share(job, {"CPU": 8.0})
    assert (share.cpus, share.concurrent) == (2.0, 4)  # 2 workers x 1 CPU each; 4 trials fit in 8 CPUs
    share = tune.trial_share(job, {"CPU": 64.0})
    assert share.concurrent == tune.trial_count(job) == 4


# ---------------------------------------------------------------------------------------------------------------
# Real searches



@pytest.mark.slow
def test_resume_reruns_only_the_failed_trial(ray_cluster, tiny_model_path, tmp_path):
    # One trial's base model is not there yet, so the search ends with it failed; once it is, --resume trains it.
    late_model = tmp_path / "late-model"
    overrides = ["output.name=resumed", "tune.scheduler.type=none", "tune.num_samples=1", "training.max_steps=2",
                 f"tune.search_space={{model.name_or_path: {{grid: [tiny, {late_model}]}}}}"]
    assert main(["tune", str(QUICKSTART_TUNE), f"output.dir={tmp_path}", *FAST, *overrides]) == 1
    run = tmp_path / "resumed"
    first = pd.read_csv(run / "trials.csv")
    assert sorted(first["status"]) == ["ERROR", "TERMINATED"]
    done = first[first["status"] == "TERMINATED"].iloc[0]["trial_id"]
    metrics_before = (run / "trials" / done / "metrics.jsonl").read_bytes()

    shutil.copytree(tiny_model_path, late_model)
    assert main(["tune", str(QUICKSTART_TUNE), f"output.dir={tmp_path}", *FAST, *overrides, "--resume"]) == 0
    second = pd.read_csv(run / "trials.csv")
    assert set(second["trial_id"]) == set(first["trial_id"]) and set(second["status"]) == {"TERMINATED"}
    assert (second["steps"] == 2).all()
    assert (run / "trials" / done / "metrics.jsonl").read_bytes() == metrics_before  # not trained again
    assert (run / "best" / "adapter" / "adapter_config.json").is_file()


def most_at_once(run: Path) -> int:
    """The most trials whose spans (spec written at start .. last report) overlap: how many ran at once."""
    spans = [((trial / "spec.yaml").stat().st_mtime, run_files.read_metrics(trial)[-1]["time"])
             for trial in (run / "trials").iterdir()]
    return max(sum(start <= t < end for start, end in spans) for t, _ in spans)


@pytest.mark.slow
def test_search_end_to_end_stops_the_absurd_trial_and_exports_the_best(searched_run):
    from peft import PeftModel

    from ray_sft import modeling

    code, out, run = searched_run.code, searched_run.out, searched_run.run_dir
    assert code == 0, out
    job = spec.load(run / "spec.yaml")
    table = pd.read_csv(run / "trials.csv")
    assert len(table) == 4 and set(table["status"]) == {"TERMINATED"}
    assert most_at_once(run) == 2
    rows = json.loads((run / "trials.json").read_text())  # the same table as trials.csv
    assert [(r["trial_id"], r["status"], r["steps"]) for r in rows] == list(
        zip(table["trial_id"], table["status"], table["steps"]))

    absurd = table[table["training.learning_rate"] == ABSURD_LR].iloc[0]
    healthy = table[table["training.learning_rate"] != ABSURD_LR]
    # Stopped at its first eval: ASHA's rung. The trial trains on while the stop travels (report -> controller ->
    # trackers -> Tune), so it may log a step past it, never a second eval.
    evals = [r["step"] for r in run_files.read_metrics(run / "trials" / absurd["trial_id"]) if "eval_loss" in r]
    assert absurd["stopped_early"] and evals == [job.training.eval_steps] and absurd["steps"] < job.training.max_steps
    # ASHA may stop a healthy trial at the same rung, and that one may stop a step sooner: compare evals, not steps.
    healthy_evals = [sum("eval_loss" in r for r in run_files.read_metrics(run / "trials" / t))
                     for t in healthy["trial_id"]]
    assert min(healthy_evals) >= len(evals) and absurd["steps"] < healthy["steps"].max()
    assert (healthy["steps"] == job.training.max_steps).any()

    best = json.loads((run / "best.json").read_text())
    winner = table.loc[table["best_eval_loss"].idxmin()]
    assert best["trial_id"] == winner["trial_id"] and best["value"] == pytest.approx(winner["best_eval_loss"])
    assert best["params"]["training.learning_rate"] == winner["training.learning_rate"]
    exported = run / "best" / "adapter" / "adapter_model.safetensors"
    assert exported.read_bytes() == (Path(best["checkpoint_path"]) / "adapter_model.safetensors").read_bytes()
    assert (run / "trials.png").stat().st_size > 10_000
    assert "[ray-sft tune]" in out

    config = json.loads((exported.parent / "adapter_config.json").read_text())
    base = modeling.load_model(config["base_model_name_or_path"], job, "cpu", training=False)
    model = PeftModel.from_pretrained(base, str(exported.parent))
    assert sum("lora_A" in n for n, _ in model.named_parameters()) > 0

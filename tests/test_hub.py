"""The shipped recipe spec, Hub ids and all, run through the clients' real Hub loading code.

Why a pre-populated cache and not a local Hub server: the self-hosted Hub implementations on PyPI were tried
against huggingface_hub 2.4 / transformers 5.24 / datasets 5.2:
- olah 0.5.4 (and 0.5.0-0.5.3, same code), offline with `mirrors-path` holding git repos of both repos:
  `GET /api/{models,datasets}/<id>` -> 401 RepoNotFound (offline it resolves the newest commit only from metadata
  its own cache kept from an earlier online run; seeding that cache by hand did not help the next point);
  `HEAD .../resolve/main/tokenizer.model` and `GET /api/models/<id>/tree/main/additional_chat_templates`, absent
  from the repo -> 401 RepoNotFound where the Hub answers 404 EntryNotFound. transformers then raised
  RepositoryNotFoundError for the tree call, datasets DatasetNotFoundError for the dataset.
- olah <= 0.4.0 resolved the plain repo route to "main" offline, but every release before 0.5.0 requires
  pydantic <= 2.8.2, which this stack (Ray Serve, FastAPI 0.165, pydantic 2.14) cannot install; their missing-file
  HEAD also answers 401.
- hf-local-hub 3.0.0: its wheel holds only a Python client; the server is a Go binary it does not ship.
So the repos go into the caches the clients read offline (tests/hub_cache.py), and the same loading code runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import hub_cache
from tests.conftest import BUNDLED_DATA, REPO, free_port

RECIPE = REPO / "jobs" / "llm-jp-3-1.8b-dolly-ja.yaml"
PROMPT = "時間管理能力をあげるには?"
# The recipe, changed only where a 2-core CPU needs it and sized down to one short step on one worker.
CPU = ("scaling.use_gpu=false", "scaling.cpus_per_worker=1", "quantization.compute_dtype=float32",
       "training.bf16=false", "training.optimizer=adamw_torch")
SIZE = ("data.max_rows=8", "training.max_steps=1", "training.per_device_batch_size=2",
        "training.gradient_accumulation_steps=1", "training.micro_batch_size=2", "training.logging_steps=1",
        "training.max_length=256")


@pytest.fixture(scope="session")
def hub_env(tiny_model_path, tmp_path_factory):
    """The environment of a fresh HF_HOME holding the recipe's model and dataset repos, for every test here."""
    home = tmp_path_factory.mktemp("hf-home")
    return hub_cache.populate(home, Path(tiny_model_path), BUNDLED_DATA)


def ray_sft(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray_sft.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600, cwd=REPO)


def test_cache_holds_the_repos_as_huggingface_hub_sees_them(hub_env):
    from huggingface_hub import scan_cache_dir

    repos = {(r.repo_type, r.repo_id): r for r in scan_cache_dir(Path(hub_env["HF_HOME"]) / "hub").repos}
    model = repos[("model", hub_cache.MODEL_ID)]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.file_name for r in model.revisions for f in r.files}
    assert ("dataset", hub_cache.DATASET_ID) in repos


def test_validate_resolves_the_recipe(hub_env):
    done = ray_sft(hub_env, "validate", str(RECIPE), *CPU, *SIZE)
    assert done.returncode == 0, done.stderr
    assert f"name_or_path: {hub_cache.MODEL_ID}" in done.stdout
    assert f"source: {hub_cache.DATASET_ID}" in done.stdout


def test_dataset_rows_keep_the_real_columns(hub_env, monkeypatch):
    import datasets

    for name, value in hub_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(hub_env["HF_HOME"]) / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    rows = datasets.load_dataset(hub_cache.DATASET_ID, split="train")
    assert tuple(rows.column_names) == hub_cache.DATASET_COLUMNS
    assert rows.num_rows == len(BUNDLED_DATA.read_text(encoding="utf-8").splitlines())


@pytest.mark.slow
def test_recipe_trains_serves_and_generates_from_hub_ids(hub_env, tmp_path):
    """`ray-sft run -v`: train, then serve the adapter (the replica loads the base by the Hub id recorded beside it)
    and ask it the sample prompt over HTTP; then `ray-sft generate` loads the same way. With -v the console shows
    the libraries' and Ray workers' output too, and no logs/ folder is written."""
    done = ray_sft(hub_env, "run", str(RECIPE), *CPU, *SIZE, f"output.dir={tmp_path}", f"serve.port={free_port()}",
                   "generation.max_new_tokens=4", "-v")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sample completion: " in done.stdout
    assert "TrainingReport(" in done.stdout + done.stderr and "(RayTrainWorker" in done.stdout + done.stderr
    assert not list(tmp_path.glob("*/logs"))
    adapter = next(tmp_path.glob("*/adapter"))
    run_dir = adapter.parent
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == hub_cache.MODEL_ID
    for text in ((run_dir / "spec.yaml").read_text(), (adapter / "README.md").read_text()):
        assert hub_cache.MODEL_ID in text and hub_cache.DATASET_ID in text
        assert hub_env["HF_HOME"] not in text  # ids, never the cache paths they resolved to

    generated = ray_sft(hub_env, "generate", "--adapter", str(adapter), "--max-new-tokens", "4", PROMPT)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.strip()


@pytest.mark.parametrize("override, named", [
    ("model.name_or_path=llm-jp/no-such-model", "llm-jp/no-such-model"),
    ("data.source=llm-jp/no-such-dataset", "llm-jp/no-such-dataset"),
    ("data.split=validation", "validation"),
    ("model.revision=no-such-revision", "no-such-revision"),
])
def test_bad_hub_input_fails_before_any_worker(hub_env, tmp_path, override, named):
    done = ray_sft(hub_env, "train", str(RECIPE), *CPU, *SIZE, f"output.dir={tmp_path}", override)
    assert done.returncode == 2, done.stderr[-3000:]
    error = next(line for line in done.stderr.splitlines() if line.startswith("error: "))
    assert named in error
    assert not list(tmp_path.glob("*/ray")), "a Ray Train run was started"

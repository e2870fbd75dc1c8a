"""Shared fixtures: the quickstart spec on the tiny model, one real local Ray cluster per session, one trained adapter.

Everything is real: the tiny model is built locally (cached), 4-bit quantization runs through bitsandbytes on CPU,
and Ray is a private cluster on 127.0.0.1 with its own temp dir (never `ray stop`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "jobs" / "quickstart.yaml"
BUNDLED_DATA = REPO / "jobs" / "data" / "dolly-ja-mini.jsonl"

# One compute thread per process: 2 cores are shared by the test process and Ray's workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Fake credentials planted for the whole session (Ray's workers inherit them): tests assert that no run file, log
# or checkpoint ever contains them.
PLANTED_SECRETS = {"HF_TOKEN": "hf_plantedSecret7Qx2Lm9Vb4Nc8Zd1", "WANDB_API_KEY": "planted0wandb0key0f3a9c1d7e5b"}
os.environ.update(PLANTED_SECRETS)


def quick_spec(tmp_path: Path, *overrides: str):
    """The quickstart spec writing under tmp_path, with overrides."""
    from ray_sft import spec

    return spec.load(QUICKSTART, [f"output.dir={tmp_path}", *overrides])


# Small and fast: a handful of optimizer steps on 2 CPU workers.
FAST = ("training.max_steps=4", "training.logging_steps=1", "training.eval_steps=2", "training.save_steps=2",
        "data.max_rows=96", "data.eval_rows=16", "training.gradient_accumulation_steps=2")


@pytest.fixture(scope="session")
def tiny_model_path():
    from ray_sft import tiny

    return str(tiny.ensure_tiny_model(str(BUNDLED_DATA)))


@pytest.fixture(scope="session")
def ray_cluster():
    """A private local Ray cluster shared by every test that needs one."""
    from ray_sft import cluster

    with cluster.connect(num_cpus=2):
        yield


@pytest.fixture(scope="session")
def trained_run(ray_cluster, tmp_path_factory):
    """One real 2-worker training run of the tiny job; later tests read its adapter and files."""
    from ray_sft import train

    job = quick_spec(tmp_path_factory.mktemp("runs"), *FAST, "output.name=shared")
    return train.fit(job)

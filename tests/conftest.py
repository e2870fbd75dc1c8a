"""Shared fixtures: the quickstart spec on the tiny model, one real local Ray cluster per session, one trained adapter.

Everything is real: the tiny model is built locally (cached), 4-bit quantization runs through bitsandbytes on CPU,
and Ray is a private cluster on 127.0.0.1 with its own temp dir (never `ray stop`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "jobs" / "quickstart.yaml"
QUICKSTART_TUNE = REPO / "jobs" / "quickstart-tune.yaml"
ABSURD_LR = 50.0  # searched_run's trial that diverges
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


def run_cli(*argv: str) -> tuple[int, str]:
    """`ray-sft ARGV` in this process (on the session's Ray cluster): (exit code, what it printed)."""
    import contextlib
    import io

    from ray_sft import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(list(argv))
    return code, out.getvalue()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PipelineRun:
    code: int
    out: str
    port: int
    run_dir: Path
    adapter_dir: Path
    metrics: dict  # the last report (what the exported model card carries)
    checkpoint_path: str


@pytest.fixture(scope="session")
def trained_run(ray_cluster, tmp_path_factory):
    """One real `ray-sft run` of the tiny job (2 workers: train, serve, one sample over HTTP); later tests read its
    output, adapter and files (one run serves every test that only reads them: it is the suite's costliest part)."""
    from ray import serve

    from ray_sft import run_files

    runs, port = tmp_path_factory.mktemp("runs"), free_port()
    code, out = run_cli("run", str(QUICKSTART), f"output.dir={runs}", *FAST, "output.name=shared",
                        "generation.max_new_tokens=16", f"serve.port={port}")
    serve.shutdown()  # the run removed its app; its HTTP proxy would hold the port of later servers
    assert code == 0, out
    run_dir = runs / "shared"
    metrics = run_files.read_metrics(run_dir)
    checkpoint = [m["checkpoint"] for m in metrics if "checkpoint" in m][-1]
    return PipelineRun(code, out, port, run_dir, run_dir / "adapter", metrics[-1], checkpoint)


@dataclass
class SearchRun:
    code: int
    out: str
    spec_file: str  # the spec the README's Quickstart line runs, as scripts/quickstart.sh names it
    run_dir: Path


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """`mlflow server` on a free loopback port with a sqlite store and its own artifact folder."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/db.sqlite",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=open(folder / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        # Without job execution (which ray_sft never asks for), MLflow 3 starts no Huey consumers: seven processes
        # that took about a minute of CPU from the suite's two cores.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a loaded 2-core machine took over 120 s once
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()
                time.sleep(0.5)
        yield uri
    finally:
        # The server and the uvicorn worker it started (a graceful stop waits out the client's open connections).
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def searched_run(ray_cluster, mlflow_uri, tmp_path_factory):
    """The README's Quickstart line, once for every test that reads a search: `ray-sft run` of the search spec that
    scripts/quickstart.sh runs (search, serve the winner, one sample over HTTP), sized down to 4 trials of 6 steps,
    2 at a time under ASHA. The spec's learning-rate distribution becomes a grid holding one absurd rate that ASHA
    must stop at its first eval; its other searched fields are drawn as the spec says. Besides the default
    TensorBoard it tracks to a real MLflow server and to W&B offline (a search of its own for those cost the suite
    two more minutes)."""
    import re

    from ray import serve

    from ray_sft import spec

    (spec_file,) = re.findall(r"ray-sft run (jobs/\S+\.yaml)", (REPO / "scripts" / "quickstart.sh").read_text())
    runs, port = tmp_path_factory.mktemp("search"), free_port()
    code, out = run_cli("run", str(REPO / spec_file), f"output.dir={runs}", f"serve.port={port}", *FAST,
                        "training.max_steps=6", "tune.num_samples=1",
                        f"tune.search_space.training.learning_rate={{grid: [1.0e-3, 2.0e-3, 3.0e-3, {ABSURD_LR}]}}",
                        "tracking.backends=[tensorboard, mlflow, wandb]", f"tracking.mlflow.uri={mlflow_uri}",
                        "tracking.wandb.mode=offline")
    serve.shutdown()  # the run removed its app; its HTTP proxy would hold the port of later servers
    return SearchRun(code, out, spec_file, runs / spec.load(REPO / spec_file).output.name)

"""`ray-sft submit` / `ray-sft jobs` against a real Ray head started here with token auth on (Ray 2.60's default).

The head has its own ports, its own temp dir and its own token; at the end only its processes are stopped (its
process group, then any process whose command line names its temp dir), never `ray stop`, which would kill every
Ray cluster on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from ray_sft import cli, jobs
from tests.conftest import QUICKSTART, REPO

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")
SECRET_NAME = "RAY_SFT_TEST_SECRET"
TINY = ("training.max_steps=2", "training.logging_steps=1", "training.eval_steps=2", "training.save_steps=2",
        "training.gradient_accumulation_steps=1", "data.max_rows=48", "data.eval_rows=8")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _answers(url: str, token: str) -> bool:
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _own_pids(temp_dir: str) -> list[int]:
    """Processes of this head: every Ray process carries its temp/session dir on its command line."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if temp_dir.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _own_pids(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        # SIGTERM gets 3 s: some of the head's processes outlasted 15 s of it, and a graceful stop is not under test.
        deadline = time.monotonic() + (3 if sig == signal.SIGTERM else 15)
        while _own_pids(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
    proc.wait(timeout=30)


def _start_head(token: str, temp_dir: str) -> tuple[subprocess.Popen, str]:
    gcs, dash, client, agent, agent_grpc, metrics, renv = _free_ports(7)
    env = {**os.environ, "RAY_AUTH_TOKEN": token, "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1",
           # the job's `python -m ray_sft.cli` must be this venv's python
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    command = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv}", f"--temp-dir={temp_dir}",
               "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{dash}"


@pytest.fixture(scope="module")
def head():
    token = secrets.token_hex(16)
    temp_dir = tempfile.mkdtemp(prefix="rsj-", dir="/tmp")  # short: Ray's unix socket paths live under it
    proc, url = _start_head(token, temp_dir)
    try:
        deadline = time.monotonic() + 180
        while not _answers(url, token):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (Path(temp_dir) / "ray-start.log").read_text()[-3000:]
                pytest.fail(f"ray start --head did not come up:\n{log}")
            time.sleep(1)
        yield {"url": url, "token": token, "temp_dir": temp_dir}
    finally:
        _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def authed(head, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", head["token"])
    return head["url"]


def _submit(capsys, url: str, *args: str) -> str:
    capsys.readouterr()
    assert cli.main(["submit", str(QUICKSTART), "--address", url, *args]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_submit_quickstart_follow_logs_adapter_lands(authed, tmp_path, capsys, monkeypatch):
    secret = "v4lue-" + secrets.token_hex(8)
    monkeypatch.setenv(SECRET_NAME, secret)
    job_id = _submit(capsys, authed, "train", f"output.dir={tmp_path}", *TINY, "--env", SECRET_NAME)
    assert job_id.startswith("raysubmit_")

    assert cli.main(["jobs", "logs", job_id, "--address", authed, "--follow"]) == 0
    followed = capsys.readouterr()
    run = tmp_path / "quickstart"
    assert "step 2/2" in followed.out and f"adapter: {run.resolve() / 'adapter'}" in followed.out
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert any((run / "ray").rglob("checkpoint_*")), "checkpoints land in the storage path"

    assert cli.main(["jobs", "status", job_id, "--address", authed]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    # The value went to the job by name (Ray holds it in the job's runtime_env) and ray_sft printed it nowhere.
    info = jobs.client(authed).get_job_info(job_id)
    assert info.runtime_env["env_vars"][SECRET_NAME] == secret
    assert cli.main(["jobs", "list", "--address", authed]) == 0
    assert cli.main(["jobs", "logs", job_id, "--address", authed]) == 0
    everything = followed.out + followed.err + capsys.readouterr().out + (run / "spec.yaml").read_text()
    assert job_id in everything and secret not in everything


def test_list_status_stop_a_long_job(authed, tmp_path, capsys):
    job_id = _submit(capsys, authed, "train", f"output.dir={tmp_path}", "training.max_steps=100000")
    deadline = time.monotonic() + 180
    while (row := jobs.status(authed, job_id)).status != "RUNNING":
        assert row.status == "PENDING" and time.monotonic() < deadline, row
        time.sleep(1)
    assert cli.main(["jobs", "list", "--address", authed]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(job_id)]
    assert len(listed) == 1 and "RUNNING" in listed[0] and "ray_sft.cli train jobs/quickstart.yaml" in listed[0]

    assert cli.main(["jobs", "stop", job_id, "--address", authed]) == 0
    assert "STOPPED" in capsys.readouterr().out
    assert jobs.status(authed, job_id).status == "STOPPED"


def test_unreachable_address_is_a_clear_error(capsys):
    (port,) = _free_ports(1)
    assert cli.main(["jobs", "list", "--address", f"http://127.0.0.1:{port}"]) == 2
    assert "cannot reach the Ray dashboard at http://127.0.0.1:" in capsys.readouterr().err


def test_missing_or_wrong_token_is_a_clear_error(head, tmp_path):
    # Fresh processes, as a user's commands are: in this one the test session's own Ray cluster is initialised,
    # and Ray's client would send that cluster's token.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token

    def ray_sft(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ray_sft.cli", *args], env={**env, **extra}, cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    done = ray_sft("jobs", "list", "--address", head["url"])
    assert done.returncode == 2, done.stderr
    assert "requires a Ray auth token and none was sent" in done.stderr and "RAY_AUTH_TOKEN" in done.stderr

    done = ray_sft("submit", str(QUICKSTART), "--address", head["url"], RAY_AUTH_TOKEN="not-" + head["token"])
    assert done.returncode == 2, done.stderr
    assert "rejected the Ray auth token from RAY_AUTH_TOKEN" in done.stderr and head["token"] not in done.stderr


def test_submit_checks_spec_and_env_names_before_contacting_the_cluster(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(SECRET_NAME, raising=False)
    address = "http://127.0.0.1:9"  # nothing is contacted: both errors come first
    assert cli.main(["submit", str(QUICKSTART), "--address", address, "lora.r=0"]) == 2
    assert "lora.r: must be > 0" in capsys.readouterr().err
    assert cli.main(["submit", str(QUICKSTART), "--address", address, "--env", SECRET_NAME]) == 2
    assert f"--env {SECRET_NAME}: not set" in capsys.readouterr().err
    outside = tmp_path / "job.yaml"
    outside.write_text(QUICKSTART.read_text())
    assert cli.main(["submit", str(outside), "--address", address]) == 2
    assert "must live inside the project" in capsys.readouterr().err

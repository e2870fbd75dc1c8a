"""Ray Jobs API client: submit a ray-sft verb to a cluster with this project as the job's working dir; list,
status, logs and stop.

Security stance: clusters keep Ray's token authentication on (Ray 2.60 turns it on for `ray start --head`). The
token is read as Ray reads it (RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token) and sent
as a bearer header; it is never printed. Environment variables for the job are named (`--env HF_TOKEN`) and their
values taken from the submitting environment; ray_sft never prints or logs those values. (Ray itself keeps a job's
runtime_env, values included, in the job record that token holders can read and logs it in the head's
runtime_env_agent.log: cluster-level secrets, such as the Kubernetes Secret in cluster/kuberay/, avoid both.)
Runs no training itself: the job runs `python -m ray_sft.cli VERB ...` from the uploaded working dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from ray_sft.cluster import RAY_ENV

PROJECT = Path(__file__).resolve().parents[1]
VERBS = ("train", "tune", "run")
# What never goes up with the working dir: environments, run outputs, history, GPU bundles, caches.
EXCLUDES = [".venv", "runs", ".git", ".gpu", ".cache", ".pytest_cache", "**/__pycache__", "*.egg-info", "bench"]
TOKEN_FILE = Path("~/.ray/auth_token")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobsError(RuntimeError):
    """A cluster that cannot be reached or refuses us, or a request it rejects; the message says what to do."""


@dataclass
class JobRow:
    job_id: str
    status: str
    entrypoint: str
    message: str
    start_time: float | None
    end_time: float | None


# ---------------------------------------------------------------------------------------------------------------
# Connecting (token auth)


def dashboard_url(address: str) -> str:
    """The address when it is the head's dashboard URL; anything else is refused at once. (Ray's client takes an
    address without a scheme for a cluster's GCS address and spends tens of seconds looking for it.)"""
    if address.startswith(("http://", "https://")):
        return address
    host = address.partition("://")[2] or address
    raise JobsError(f"{address!r} is not a dashboard URL: give the head's dashboard with its scheme, "
                    f"e.g. http://{host or 'HEAD:8265'} (the dashboard's default port is 8265)")


def split_verb(words: list[str]) -> tuple[str, list[str]]:
    """`[train|tune|run] k=v ...` -> (verb, overrides); the verb defaults to train."""
    if not words or "=" in words[0]:
        return "train", list(words)
    if words[0] not in VERBS:
        raise JobsError(f"submit: {words[0]!r} is neither a verb submit takes ({', '.join(VERBS)}) nor a "
                        "section.field=value override")
    return words[0], list(words[1:])


def auth_token() -> tuple[str | None, str]:
    """(token, where it came from) the way Ray looks for it; (None, reason) when there is none to send."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or TOKEN_FILE).expanduser()
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip(), str(path)
    return None, "no RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"


def client(address: str):
    """A JobSubmissionClient for `address` (http://HEAD:8265), with the token; clear errors when it fails."""
    from ray.job_submission import JobSubmissionClient

    token, where = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if not token:
        _forget_rays_cached_token()
    with _translated(address, where):
        return JobSubmissionClient(address, headers=headers)


def _forget_rays_cached_token() -> None:
    """Without a token of ours, JobSubmissionClient adds Ray's own, which Ray caches per process once any
    ray.init ran here: it could be a stale token from a since-changed environment. Make Ray re-read the same
    sources auth_token() just found empty."""
    from ray import _raylet

    from ray_sft.couplings import require

    loader = require("ray", _raylet, "AuthenticationTokenLoader")
    require("ray", loader.instance(), "reset_cache")()


@contextlib.contextmanager
def _translated(address: str, token_source: str):
    """Ray's connection and auth exceptions -> one JobsError saying what to check."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        if "Authentication required" in str(exc):
            raise JobsError(f"{address} requires a Ray auth token and none was sent ({token_source}): set "
                            "RAY_AUTH_TOKEN or write the head's token (`ray get-auth-token` on the head) to "
                            "~/.ray/auth_token") from None
        raise JobsError(f"{address} rejected the Ray auth token from {token_source}: it is not this cluster's "
                        "token") from None
    except (ConnectionError, requests.exceptions.ConnectionError) as exc:
        raise JobsError(f"cannot reach the Ray dashboard at {address}: is the head running, and is its dashboard "
                        f"port (default 8265) reachable from here? ({type(exc).__name__})") from None
    except RuntimeError as exc:  # the client raises RuntimeError for any other non-2xx answer
        raise JobsError(f"{address}: {str(exc).strip()}") from None


# ---------------------------------------------------------------------------------------------------------------
# Submitting


def spec_in_project(spec_path: str | Path) -> str:
    """The spec's path relative to the project root: the job sees the project, not this machine's files."""
    path = Path(spec_path).resolve()
    try:
        return path.relative_to(PROJECT).as_posix()
    except ValueError:
        raise JobsError(f"{spec_path}: a submitted spec must live inside the project ({PROJECT}), which is "
                        "uploaded as the job's working dir") from None


def env_values(names: list[str]) -> dict[str, str]:
    """The named variables from this environment; a missing one is an error that names it (never a value)."""
    ours = [n for n in names if n in RAY_ENV]
    if ours:  # the job's driver sets these in its own ray.init; Ray refuses a job that sets them too
        raise JobsError(f"--env {', '.join(ours)}: set by ray_sft itself in every job")
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise JobsError(f"--env {', '.join(missing)}: not set in this environment")
    return {n: os.environ[n] for n in names}


def entrypoint(verb: str, spec_rel: str, overrides: list[str], extra: list[str] = ()) -> str:
    """The job's command: the uploaded package's CLI (python -m uses the working dir's ray_sft)."""
    if verb not in VERBS:
        raise JobsError(f"submit: verb {verb!r} is not one of {', '.join(VERBS)}")
    return shlex.join(["python", "-m", "ray_sft.cli", verb, spec_rel, *overrides, *extra])


def runtime_env(env: dict[str, str], pip: list[str]) -> dict:
    # Not RAY_ENV: cluster.connect passes those in the job driver's ray.init, and Ray fails a job whose
    # runtime_env sets a variable the driver's sets too (printing the whole runtime_env, values included).
    renv = {"working_dir": str(PROJECT), "excludes": list(EXCLUDES), "env_vars": dict(env)}
    if pip:
        renv["pip"] = list(pip)
    return renv


def submit(address: str, spec_path: str, verb: str = "train", overrides: list[str] = (),
           env_names: list[str] = (), pip: list[str] = ()) -> str:
    """Validate the spec here, then submit `ray-sft VERB spec overrides` as a Ray job; returns the job id."""
    from ray_sft import spec

    spec.load(spec_path, list(overrides))  # a bad spec fails here (exit 2), not minutes later on the cluster
    # A job has no terminal: `run` must not wait for Ctrl-C there (it ends after its sample by default).
    command = entrypoint(verb, spec_in_project(spec_path), list(overrides))
    renv = runtime_env(env_values(list(env_names)), list(pip))
    jobs = client(address)
    with _translated(address, "the token"):
        return jobs.submit_job(entrypoint=command, runtime_env=renv,
                               metadata={"ray_sft_verb": verb, "ray_sft_spec": spec_in_project(spec_path)})


# ---------------------------------------------------------------------------------------------------------------
# Watching and stopping


def _row(details) -> JobRow:
    # Only these fields: a job's runtime_env carries environment values and is never shown.
    return JobRow(details.submission_id or details.job_id, str(details.status.value), details.entrypoint,
                  details.message or "", _seconds(details.start_time), _seconds(details.end_time))


def _seconds(ms) -> float | None:
    return ms / 1000 if ms else None


def list_jobs(address: str) -> list[JobRow]:
    jobs = client(address)
    with _translated(address, "the token"):
        rows = [_row(d) for d in jobs.list_jobs() if d.submission_id]  # driver-only entries have no id to act on
    return sorted(rows, key=lambda r: r.start_time or 0)


def status(address: str, job_id: str) -> JobRow:
    jobs = client(address)
    with _translated(address, "the token"):
        return _row(jobs.get_job_info(job_id))


def logs(address: str, job_id: str) -> str:
    jobs = client(address)
    with _translated(address, "the token"):
        return jobs.get_job_logs(job_id)


def follow(address: str, job_id: str, write) -> JobRow:
    """Stream the job's logs to `write` until it ends; returns its final status."""
    jobs = client(address)

    async def tail():
        async for chunk in jobs.tail_job_logs(job_id):
            write(chunk)

    with _translated(address, "the token"):
        jobs.get_job_info(job_id)  # an unknown id fails here with the server's message, not inside the stream
        asyncio.run(tail())
    return wait(address, job_id, timeout_s=30)


def wait(address: str, job_id: str, timeout_s: float, poll_s: float = 1.0) -> JobRow:
    """Poll until the job is in a terminal state (or the timeout); returns the last status seen."""
    deadline = time.monotonic() + timeout_s
    row = status(address, job_id)
    while row.status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(poll_s)
        row = status(address, job_id)
    return row


def stop(address: str, job_id: str, timeout_s: float = 60) -> JobRow:
    """Ask the cluster to stop the job and wait until it has."""
    jobs = client(address)
    with _translated(address, "the token"):
        jobs.stop_job(job_id)
    return wait(address, job_id, timeout_s)


def describe(row: JobRow) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.start_time)) if row.start_time else "-"
    took = f"{row.end_time - row.start_time:.0f}s" if row.start_time and row.end_time else "-"
    return f"{row.job_id}  {row.status:<9} started {started}  took {took}  {row.entrypoint}"

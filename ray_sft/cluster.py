"""Connecting to Ray: an embedded local cluster on 127.0.0.1, an existing cluster, or the one a Ray job runs in."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time

from ray_sft import proxy

log = logging.getLogger(__name__)

# Set for every process of a run (driver, Ray Train controller, workers):
# - RAY_TRAIN_ENABLE_PRINT_PATCH=0: worker logs otherwise carry thousands of lines of bytecode dumps.
# - RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: the controller collects reports at this interval (default 2 s) and a
#   worker's next report waits until the previous one is collected; logging steps shorter than that stalled, and a
#   worker dying within 2 s of a checkpoint report lost that checkpoint to a restart.
RAY_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
# Added for a private local cluster only (a joined cluster's nodes have their own environment: cluster/Dockerfile).
# Ray Train's preemption watcher (an actor process per worker group that polls for nodes being drained) has nothing
# to watch on one machine whose cluster lives and dies with the run. Serve's HTTP proxy answers a request a dead
# replica held with a JSON 503, not uvicorn's plain-text 500 (ray_sft.proxy).
EMBEDDED_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": proxy.CALLBACK}


def embedded(address: str | None) -> bool:
    """True when `connect(address)` will start a private local cluster rather than join one."""
    return not address and not os.environ.get("RAY_ADDRESS")


@contextlib.contextmanager
def connect(address: str | None = None, num_cpus: int | None = None):
    """Yield with Ray initialised; shut down only what this call started.

    address None: inside a Ray job (RAY_ADDRESS set) join that cluster, else start a private local cluster
    with its own temp dir and a loopback-only dashboard (when installed), which never touches other Ray clusters
    on the machine. (Ray 2.60 advertises the machine's routable address for its internal ports even when asked for
    127.0.0.1; the services ray_sft itself opens, such as Serve's HTTP port, bind 127.0.0.1 unless told otherwise.)
    """
    import ray

    env = RAY_ENV | (EMBEDDED_RAY_ENV if embedded(address) else {})
    for key, value in env.items():  # a value the user set wins
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        yield
        return
    from ray_sft.console import say

    temp_dir, started = None, time.monotonic()
    runtime_env = {"env_vars": {k: os.environ[k] for k in env}}
    if not embedded(address):
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        where = f"joined {address or os.environ['RAY_ADDRESS']}"
    else:
        temp_dir = _start_local(num_cpus, runtime_env)
        where = "local Ray cluster up"
    resources = ray.cluster_resources()
    say(f"cluster: {where} in {time.monotonic() - started:.0f}s ({resources.get('CPU', 0):g} CPUs, "
        f"{resources.get('GPU', 0):g} GPUs)")
    try:
        yield
    finally:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _start_local(num_cpus: int | None, runtime_env: dict, attempts: int = 3) -> str:
    """Start a private local cluster; return its temp dir.

    Ray 2.60's raylet gives its dashboard agent a hard-coded 15 s to start and dies otherwise (ray-project/ray
    #65983); on a loaded 2-core machine the agent's imports can take longer, so a failed start is retried.
    """
    import ray

    dashboard = dashboard_available()
    for attempt in range(1, attempts + 1):
        # A short path: Ray's unix sockets live under it and have a ~100 character limit.
        temp_dir = tempfile.mkdtemp(prefix="rsft-", dir="/tmp")
        try:
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=dashboard,
                     dashboard_host="127.0.0.1", _temp_dir=temp_dir, num_cpus=num_cpus, runtime_env=runtime_env,
                     configure_logging=False)
            break
        except Exception as exc:  # Ray raises a bare Exception for a node that timed out during startup
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
            if attempt == attempts or "timed out during startup" not in str(exc):
                raise
    return temp_dir


def dashboard_available() -> bool:
    """Whether Ray's dashboard packages (ray[default]) are installed.

    The dashboard serves Ray's state API, which Ray Train needs to release the CPUs/GPUs of a run whose controller
    died (a trial ASHA stopped, say); it listens on loopback only. A slim Ray install (such as a GPU image with
    bare `ray`) still runs everything, with a warning: there, a stopped trial's resources are freed only when the
    search ends.
    """
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError as exc:
        log.warning("Ray's dashboard packages are missing (%s): the local cluster starts without the dashboard, "
                    "and resources of stopped trials are freed only when the run ends", exc)
        return False
    return True

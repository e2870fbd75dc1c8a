"""The served adapters of one app: a small detached actor that the driver publishes to and every replica watches.

Replicas load a published change in place, so a new folder under a served name is swapped in on every replica
without a restart and without failing in-flight requests (a Serve redeploy would restart replicas). Detached, so
an app left running by `ray-sft serve --detach` keeps it.

The registry survives its own death: Ray restarts it (on any node) and retries the calls made meanwhile, and it
reads back what was published from the GCS's key-value store. That store is where Serve keeps its own config, so
it outlives the driver and any node but the head, as the app does; a file in the run folder would be on one
machine only (and `--adapter` serving has no run folder).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import ray
from ray.experimental import internal_kv

from ray_sft import couplings
from ray_sft.targets import ServeError

NAMESPACE = "ray_sft"
_kv_get = couplings.require("ray", internal_kv, "_internal_kv_get", ("namespace",))
_kv_put = couplings.require("ray", internal_kv, "_internal_kv_put", ("namespace",))
_kv_del = couplings.require("ray", internal_kv, "_internal_kv_del", ("namespace",))


def name_of(app: str) -> str:
    return f"{app}-adapters"


def entry(path: str | Path) -> dict:
    """An adapter as the registry carries it; the stamp makes a rewritten folder at the same path a change."""
    path = Path(path).resolve()
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise ServeError(f"{path}: not an adapter folder (no adapter_model.safetensors)")
    stat = weights.stat()
    return {"path": str(path), "stamp": f"{stat.st_mtime_ns}-{stat.st_size}"}


def open_for(app: str):
    """The app's registry, created on first use."""
    return AdapterRegistry.options(name=name_of(app), namespace=NAMESPACE, lifetime="detached",
                                   get_if_exists=True).remote(name_of(app))


def find(name: str):
    return ray.get_actor(name, namespace=NAMESPACE)


def remove(app: str) -> None:
    with contextlib.suppress(ValueError):  # never created, or already gone
        ray.kill(find(name_of(app)), no_restart=True)
    _kv_del(name_of(app), namespace=NAMESPACE)


# Restarted without limit, and a call to a restarting registry waits for it rather than failing.
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class AdapterRegistry:
    """name -> folder and stamp, versioned, and which version each replica has loaded (or failed to load)."""

    def __init__(self, name: str):
        self.name = name
        saved = _kv_get(name, namespace=NAMESPACE)
        state = json.loads(saved) if saved else {"version": 0, "entries": {}, "setup": None}
        self.version, self.entries, self.setup_digest = state["version"], state["entries"], state["setup"]
        self.applied, self.failed = {}, {}

    def publish(self, entries: dict, setup: str) -> int:
        version = self.version + 1
        # Stored before it is visible: a restarted registry never hands out an older version than a replica has.
        _kv_put(self.name, json.dumps({"version": version, "entries": entries, "setup": setup}),
                namespace=NAMESPACE)
        self.version, self.entries, self.setup_digest = version, entries, setup
        return version

    def setup(self) -> str | None:
        return self.setup_digest

    def snapshot(self) -> tuple[int, dict]:
        return self.version, self.entries

    def ack(self, replica: str, version: int, failure: tuple[int, str] | None = None) -> None:
        """The version `replica` serves and, if it could not load a later one, that version and why."""
        self.applied[replica] = (version, time.monotonic())
        if failure:
            self.failed[failure[0]] = f"replica {replica}: {failure[1]}"

    def progress(self, version: int) -> tuple[int, str | None]:
        """(replicas serving `version`, why a replica could not load it, if one could not)."""
        # Replicas that stopped acknowledging (scaled down, dead) are not counted.
        now = time.monotonic()
        return sum(v == version and now - t < 5 for v, t in self.applied.values()), self.failed.get(version)

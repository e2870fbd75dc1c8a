"""The served adapters of one app: a small detached actor that the driver publishes to and every replica watches.

Replicas load a published change in place, so a new folder under a served name is swapped in on every replica
without a restart and without failing in-flight requests (a Serve redeploy would restart replicas). Detached, so
an app left running by `ray-sft serve --detach` keeps it.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import ray

from ray_sft.targets import ServeError

NAMESPACE = "ray_sft"


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
                                   get_if_exists=True).remote()


def find(name: str):
    return ray.get_actor(name, namespace=NAMESPACE)


def remove(app: str) -> None:
    with contextlib.suppress(ValueError):  # never created, or already gone
        ray.kill(find(name_of(app)))


@ray.remote(num_cpus=0)
class AdapterRegistry:
    """name -> folder and stamp, versioned, and which version each replica has loaded."""

    def __init__(self):
        self.version, self.entries, self.setup_digest, self.applied = 0, {}, None, {}

    def publish(self, entries: dict, setup: str) -> int:
        self.version, self.entries, self.setup_digest = self.version + 1, entries, setup
        return self.version

    def setup(self) -> str | None:
        return self.setup_digest

    def snapshot(self) -> tuple[int, dict]:
        return self.version, self.entries

    def ack(self, replica: str, version: int) -> None:
        self.applied[replica] = (version, time.monotonic())

    def count_applied(self, version: int) -> int:
        # Replicas that stopped acknowledging (scaled down, dead) are not counted.
        now = time.monotonic()
        return sum(v == version and now - t < 5 for v, t in self.applied.values())

"""The Serve app's deployment and lifecycle: `start` brings up the HTTP proxy, `deploy` runs (or hot-swaps) an app
built by `build_app`, `stop` removes it; `app_builder` is the same app for a Serve config (KubeRay RayService).

The replica (`replica.ModelServer`) serves; the app's adapters live in its registry (`registry`), which is how a
deploy of a new folder under a served name reaches running replicas without restarting them. What to serve comes
from `targets`. Imports neither `train` nor `tune`: adapters are loaded from the files train wrote.
"""

import hashlib
import time

import ray
from ray import serve
from ray.serve.config import BackpressureConfig

from ray_sft import fit, registry, targets
from ray_sft.replica import ModelServer
from ray_sft.spec import JobSpec, to_dict, with_values

APP_NAME = "ray_sft"


def resolve(spec: JobSpec, adapters: int, cluster: dict[str, float]) -> JobSpec:
    """The spec a replica runs with: serve's "auto" values decided for `adapters` adapters on a cluster with these
    resources (ray.cluster_resources()), so a replica only ever sees a GPU count and a merge flag."""
    s = spec.serve
    gpus = (1 if cluster.get("GPU", 0) > 0 else 0) if s.gpus_per_replica == "auto" else s.gpus_per_replica
    # One adapter on a GPU merges: the dense model needs no per-row LoRA at all (the fast path). Several adapters
    # stay unmerged, each row on its own; on CPU nothing is graphed and the 4-bit base keeps the replica small.
    merge = (adapters == 1 and gpus > 0) if s.merge == "auto" else s.merge
    # Per-row LoRA on a dense base is what makes several adapters fast on a GPU; on CPU the 4-bit base keeps the
    # replica small.
    dense = gpus > 0 if s.dequantize_base == "auto" else s.dequantize_base
    slots = (32 if gpus > 0 else 8) if s.max_batch_size == "auto" else s.max_batch_size
    return with_values(spec, {"serve.gpus_per_replica": gpus, "serve.merge": merge, "serve.dequantize_base": dense,
                              "serve.max_batch_size": slots})


def replica_spec(spec: JobSpec, adapters: dict[str, str]) -> JobSpec:
    # The one place the driver looks at the cluster's GPUs: at deploy time, before any replica starts.
    return resolve(spec, len(adapters), ray.cluster_resources())


def build_app(spec: JobSpec, base: str, registry_name: str, api_key: str | None = None):
    """The Serve application on `base` with the (resolved) spec's serve settings; adapters come from the named
    registry."""
    s = spec.serve
    deployment = ModelServer.options(
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
        # A second batch waits in the engine, so a slot that frees is refilled at the next step, not a round trip
        # through the proxy later; the rest wait at the proxy, where Serve sheds what exceeds its queue (503).
        max_ongoing_requests=2 * s.max_batch_size,
        max_queued_requests=s.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=s.retry_after_s),
        autoscaling_config={
            "min_replicas": s.autoscaling.min_replicas, "max_replicas": s.autoscaling.max_replicas,
            "target_ongoing_requests": s.autoscaling.target_ongoing_requests,
            "upscale_delay_s": s.autoscaling.upscale_delay_s, "downscale_delay_s": s.autoscaling.downscale_delay_s,
            "look_back_period_s": s.autoscaling.look_back_period_s},
    )
    return deployment.bind(base, to_dict(spec), _digest(api_key), registry_name)


def _digest(api_key: str | None) -> str | None:
    # Only a digest of the key leaves this process: Serve stores deployment arguments in the cluster.
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else None


def start(host: str, port: int, request_timeout_s: float) -> str:
    """Start Serve's HTTP proxy on host:port, ending every request after request_timeout_s (Ray must be connected);
    returns the base URL. A Serve instance already running keeps its proxy's settings (Serve warns)."""
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s})
    return f"http://{host}:{port}"


def deploy(spec: JobSpec, base: str, adapters: dict[str, str], api_key: str | None = None,
           name: str = APP_NAME, route_prefix: str = "/", timeout_s: float = 300) -> None:
    """Serve `adapters` (name -> folder) on `base`; wait until every replica serves them.

    When the app already runs with the same base, resolved spec and key, only the adapters change: a hot swap. One
    that fails on a replica puts every replica back on the previous adapters and raises ServeError with the reason.
    """
    spec = replica_spec(spec, adapters)
    adapter_registry, previous, version, running = _publish(spec, base, adapters, api_key, name, route_prefix)
    if not running:
        serve.run(build_app(spec, base, registry.name_of(name), api_key), name=name, route_prefix=route_prefix)
    try:
        _wait_applied(adapter_registry, name, version, timeout_s)
    except targets.ServeError as exc:
        if not running:
            raise
        _roll_back(adapter_registry, name, previous, exc, timeout_s)
        raise targets.ServeError(f"{exc}; every replica serves the previous adapters again") from exc


def app_builder(args: dict):
    """Serve config entry point (KubeRay RayService, `serve run`): args {"spec": JOB.yaml, "overrides": [...]}.

    Serves what `ray-sft serve JOB.yaml` serves; the API key comes from the spec's environment variable.
    """
    job, base, adapters = targets.load(args["spec"], list(args.get("overrides", [])), [], None)
    job = replica_spec(job, adapters)
    key = targets.api_key(job, job.serve.host)
    _publish(job, base, adapters, key, APP_NAME, "/")
    return build_app(job, base, registry.name_of(APP_NAME), key)


def _publish(spec: JobSpec, base: str, adapters: dict[str, str], api_key: str | None, name: str,
             route_prefix: str):
    """Put the adapters in the app's registry, once each is known to load on the base; (registry, the entries it
    had, the new version, whether the same app already runs)."""
    targets.check_adapters(spec, base, adapters)
    entries = {n: registry.entry(p) for n, p in adapters.items()}
    fit.check(spec, base, adapters)
    setup = hashlib.sha256(repr((base, to_dict(spec), _digest(api_key), route_prefix)).encode()).hexdigest()
    adapter_registry = registry.open_for(name)
    running = name in serve.status().applications and ray.get(adapter_registry.setup.remote()) == setup
    previous = ray.get(adapter_registry.snapshot.remote())[1]
    return adapter_registry, previous, ray.get(adapter_registry.publish.remote(entries, setup)), running


def _wait_applied(adapter_registry, name: str, version: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replicas = serve.status().applications[name].deployments["ModelServer"].replica_states.get("RUNNING", 0)
        applied, failure = ray.get(adapter_registry.progress.remote(version))
        if failure:
            raise targets.ServeError(f"serve: the adapters did not load: {failure}")
        if replicas and applied >= replicas:
            return
        time.sleep(0.2)
    raise targets.ServeError(f"serve: replicas did not load the adapters within {timeout_s:.0f}s "
                             "(see the replica logs)")


def _roll_back(adapter_registry, name: str, previous: dict, failed: targets.ServeError, timeout_s: float) -> None:
    """Publish the adapters served before a failed swap again, so that no replica stays on the new ones."""
    setup = ray.get(adapter_registry.setup.remote())
    try:
        _wait_applied(adapter_registry, name, ray.get(adapter_registry.publish.remote(previous, setup)), timeout_s)
    except targets.ServeError as exc:
        raise targets.ServeError(f"{failed}; rolling back to the previous adapters failed too: {exc}") from exc


def stop(name: str = APP_NAME) -> None:
    """Remove the app and its registry from the connected cluster."""
    serve.delete(name)
    registry.remove(name)


def run_until_interrupted(name: str = APP_NAME) -> None:
    """Block until Ctrl-C, then remove the app (and only it: the cluster may be shared)."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop(name)
        print("stopped", flush=True)

"""The Serve app: one base model per replica with adapters on top, OpenAI-compatible routes, batching, auth, limits.

Read top-down: `start` brings up the HTTP proxy, `deploy` runs (or hot-swaps) an app built by `build_app`,
`ModelServer` is the replica. The served adapters live in a small named actor, the `AdapterRegistry`: every
replica watches it and loads changes in place, so deploying a new folder under a served name swaps it on every
replica without a restart and without failing in-flight requests (a Serve redeploy would restart replicas).
Imports neither `train` nor `tune`: adapters are loaded from the files train wrote.
"""

import asyncio
import concurrent.futures
import contextlib
import copy
import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
import ray
from ray import serve
from starlette.exceptions import HTTPException

from ray_sft import engine, generate, modeling, multi_lora, openai_api
from ray_sft.generate import Completion
from ray_sft.openai_api import ApiError
from ray_sft.spec import GenerationSpec, JobSpec, from_dict, to_dict, with_values

# Serve routes this logger to the replica log files; another name would be dropped inside a replica.
log = logging.getLogger("ray.serve")

APP_NAME = "ray_sft"
REGISTRY_NAMESPACE = "ray_sft"
WATCH_INTERVAL_S = 0.5
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ServeError(ValueError):
    """A serving set-up that must not start (bad adapter names, a public host without an API key, ...)."""


# ---------------------------------------------------------------------------------------------------------------
# Driver side: app, start, deploy


def base_name(base: str) -> str:
    """The name clients use for the bare base: a Hub id as is, a local folder by its last component."""
    return Path(base).name if Path(base).exists() else base


def adapter_entry(path: str | Path) -> dict:
    """An adapter as the registry carries it; the stamp makes a rewritten folder at the same path a change."""
    path = Path(path).resolve()
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise ServeError(f"{path}: not an adapter folder (no adapter_model.safetensors)")
    stat = weights.stat()
    return {"path": str(path), "stamp": f"{stat.st_mtime_ns}-{stat.st_size}"}


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


def build_app(spec: JobSpec, base: str, registry: str, api_key: str | None = None):
    """The Serve application on `base` with the (resolved) spec's serve settings; adapters come from the named
    registry."""
    s = spec.serve
    deployment = ModelServer.options(
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
        max_ongoing_requests=2 * s.max_batch_size,
        autoscaling_config={
            "min_replicas": s.autoscaling.min_replicas, "max_replicas": s.autoscaling.max_replicas,
            "target_ongoing_requests": s.autoscaling.target_ongoing_requests,
            "upscale_delay_s": s.autoscaling.upscale_delay_s, "downscale_delay_s": s.autoscaling.downscale_delay_s,
            "look_back_period_s": s.autoscaling.look_back_period_s},
    )
    return deployment.bind(base, to_dict(spec), _digest(api_key), registry)


def _digest(api_key: str | None) -> str | None:
    # Only a digest of the key leaves this process: Serve stores deployment arguments in the cluster.
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else None


def _check_adapters(spec: JobSpec, base: str, adapters: dict[str, str]) -> None:
    if not adapters:
        raise ServeError("serve: at least one adapter is needed (--adapter NAME=PATH or a job spec)")
    bad = [n for n in adapters if not ADAPTER_NAME.match(n) or n == base_name(base)]
    if bad:
        raise ServeError(f"serve: invalid adapter name(s) {bad}: use letters, digits, '.', '_', '-' "
                         "(at most 64) and not the base's name")
    if len(adapters) > spec.serve.max_adapters_per_replica:
        raise ServeError(f"serve: {len(adapters)} adapters exceed serve.max_adapters_per_replica "
                         f"({spec.serve.max_adapters_per_replica})")
    if spec.serve.merge and len(adapters) != 1:
        raise ServeError("serve.merge: a merged model serves exactly one adapter")


def api_key(spec: JobSpec, host: str) -> str | None:
    """The API key from the environment variable the spec names; refuse a non-loopback host without one."""
    key = os.environ.get(spec.serve.api_key_env) if spec.serve.api_key_env else None
    if not key and not _loopback(host):
        where = (f"set the environment variable {spec.serve.api_key_env}" if spec.serve.api_key_env
                 else "set serve.api_key_env to the name of an environment variable holding a key")
        raise ServeError(f"serve: binding {host} exposes the model beyond this machine; an API key is "
                         f"required: {where}")
    return key


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start(host: str, port: int) -> str:
    """Start Serve's HTTP proxy on host:port (Ray must be connected); returns the base URL."""
    serve.start(http_options={"host": host, "port": port})
    return f"http://{host}:{port}"


def deploy(spec: JobSpec, base: str, adapters: dict[str, str], api_key: str | None = None,
           name: str = APP_NAME, route_prefix: str = "/", timeout_s: float = 300) -> None:
    """Serve `adapters` (name -> folder) on `base`; wait until every replica serves them.

    When the app already runs with the same base, resolved spec and key, only the adapters change: a hot swap.
    """
    spec = replica_spec(spec, adapters)
    registry, version, running = _publish(spec, base, adapters, api_key, name, route_prefix)
    if not running:
        serve.run(build_app(spec, base, _registry_name(name), api_key), name=name, route_prefix=route_prefix)
    _wait_applied(registry, name, version, timeout_s)


def app_builder(args: dict):
    """Serve config entry point (KubeRay RayService, `serve run`): args {"spec": JOB.yaml, "overrides": [...]}.

    Serves what `ray-sft serve JOB.yaml` serves; the API key comes from the spec's environment variable.
    """
    job, base, adapters = targets(args["spec"], list(args.get("overrides", [])), [], None)
    job = replica_spec(job, adapters)
    key = api_key(job, job.serve.host)
    _publish(job, base, adapters, key, APP_NAME, "/")
    return build_app(job, base, _registry_name(APP_NAME), key)


def _publish(spec: JobSpec, base: str, adapters: dict[str, str], api_key: str | None, name: str,
             route_prefix: str):
    """Put the adapters in the app's registry; (registry, version, whether the same app already runs)."""
    _check_adapters(spec, base, adapters)
    entries = {n: adapter_entry(p) for n, p in adapters.items()}
    setup = hashlib.sha256(repr((base, to_dict(spec), _digest(api_key), route_prefix)).encode()).hexdigest()
    registry = AdapterRegistry.options(name=_registry_name(name), namespace=REGISTRY_NAMESPACE, lifetime="detached",
                                       get_if_exists=True).remote()
    running = name in serve.status().applications and ray.get(registry.setup.remote()) == setup
    return registry, ray.get(registry.publish.remote(entries, setup)), running


def _wait_applied(registry, name: str, version: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replicas = serve.status().applications[name].deployments["ModelServer"].replica_states.get("RUNNING", 0)
        if replicas and ray.get(registry.count_applied.remote(version)) >= replicas:
            return
        time.sleep(0.2)
    raise ServeError(f"serve: replicas did not load the adapters within {timeout_s:.0f}s (see the replica logs)")


def stop(name: str = APP_NAME) -> None:
    """Remove the app and its registry from the connected cluster."""
    serve.delete(name)
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(_registry_name(name), namespace=REGISTRY_NAMESPACE))


def run_until_interrupted(name: str = APP_NAME) -> None:
    """Block until Ctrl-C, then remove the app (and only it: the cluster may be shared)."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop(name)
        print("stopped", flush=True)


def _registry_name(app: str) -> str:
    return f"{app}-adapters"


@ray.remote(num_cpus=0)
class AdapterRegistry:
    """The served adapters of one app (name -> folder and stamp), versioned, and which version each replica
    has loaded. Detached, so an app left running by `ray-sft serve --detach` keeps it."""

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


# ---------------------------------------------------------------------------------------------------------------
# Replica side


@dataclass
class Job:
    """One accepted request, before the engine takes it."""

    model: str
    prompt: str
    ids: list[int]
    settings: GenerationSpec
    stops: list[str]


# No interactive docs or schema: they would describe the API to anyone who can reach it, key or not.
api = FastAPI(title="ray_sft", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    return JSONResponse(openai_api.error_body(str(exc.detail), "invalid_request_error", str(exc.status_code)),
                        status_code=exc.status_code)


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception):
    # Even a bug answers in OpenAI's error shape (clients parse it); the traceback stays in the replica log.
    return JSONResponse(openai_api.error_body("internal server error", "server_error", "internal_error"),
                        status_code=500)


@serve.deployment
@serve.ingress(api)
class ModelServer:
    def __init__(self, base: str, spec: dict, key_hash: str | None, registry: str):
        import torch

        self.spec = from_dict(spec)
        self.base, self.key_hash = base, key_hash
        torch.set_num_threads(max(1, int(self.spec.serve.cpus_per_replica)))
        self.device = "cuda" if self.spec.serve.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
        self.tokenizer = modeling.load_tokenizer(base, self.spec.model)
        # Requests are measured with a second tokenizer: a fast tokenizer used from two threads at once can fail
        # with "Already borrowed" while the engine's thread decodes.
        self.counter = copy.deepcopy(self.tokenizer)
        # Prompts are measured off the event loop (a long one must not hold up other requests and /healthz), on one
        # thread, since the counter is not safe to share between threads either.
        self.measuring = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="measure")
        # A merged replica builds its model from a fresh base when its adapter arrives (see _apply_adapters).
        self.model = None if self.spec.serve.merge else self._base_model()
        self.route: multi_lora.Route | None = None
        self.adapters: dict[str, str] = {}  # served name -> internal peft adapter name
        self.stamps: dict[str, dict] = {}
        self.version = 0
        # Every model operation runs on the engine's one thread, between decode steps: an adapter load never
        # overlaps a forward pass.
        self.engine = engine.Engine(self.tokenizer, self.spec.serve.max_batch_size,
                                    generate.longest_request(self.spec))
        threading.Thread(target=self.engine.serve_forever, daemon=True, name="model").start()
        self.registry = ray.get_actor(registry, namespace=REGISTRY_NAMESPACE)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._sync()  # the first adapters load before Serve marks the replica ready
        threading.Thread(target=self._watch, daemon=True, name="adapter-watch").start()

    def _base_model(self):
        model = modeling.load_model(self.base, self.spec, self.device, False)
        if self.spec.serve.dequantize_base and getattr(model, "is_quantized", False):
            model.dequantize()  # once, so every step runs dense matmuls (and the decode step can be graphed)
        return model

    # -- adapters (hot swap) -------------------------------------------------------------------------------------

    def _watch(self) -> None:
        while True:
            time.sleep(WATCH_INTERVAL_S)
            try:
                self._sync()
            except Exception:  # a bad folder keeps the adapters already served; the deploy call times out
                log.exception("adapter update failed")

    def _sync(self) -> None:
        version, entries = ray.get(self.registry.snapshot.remote())
        if version != self.version:
            self.engine.call(lambda: self._apply_adapters(entries)).result()
            self.version = version
        self.registry.ack.remote(self.replica_id, version)

    def _apply_adapters(self, wanted: dict[str, dict]) -> None:
        """Load new or changed adapters under fresh internal names, switch the served names over, drop the replaced
        weights, and hand the engine the new adapter stacks. Runs on the engine's thread, between steps."""
        changed = {n: e for n, e in wanted.items() if self.stamps.get(n) != e}
        if self.spec.serve.merge:
            if changed:
                (name, entry), = wanted.items()
                base_model = generate.load_base(self.base, self.spec, self.device)[1]
                self.engine.load(generate.merged(base_model, entry["path"]), {name: 0})
                self.adapters, self.stamps = {name: "default"}, dict(wanted)
            return
        if self.route is not None:
            multi_lora.detach(self.route)  # PEFT loads and deletes adapters on its own layers
        try:
            self._load_changed(wanted, changed)
        finally:  # even after a bad folder, the engine serves what is loaded
            model, self.route = multi_lora.attach(self.model, list(self.adapters.values()),
                                                  modeling.compute_dtype(self.spec.quantization))
            routes = {name: index for index, name in enumerate(self.adapters, start=1)}
            self.engine.load(model, {base_name(self.base): 0, **routes}, self.route)

    def _load_changed(self, wanted: dict[str, dict], changed: dict[str, dict]) -> None:
        replaced = [self.adapters[n] for n in self.adapters if n not in wanted or n in changed]
        for name, entry in changed.items():
            internal = f"a{uuid.uuid4().hex[:12]}"
            self.model = generate.add_adapter(self.model, entry["path"], internal)
            self.adapters[name], self.stamps[name] = internal, entry
            log.info("adapter %s loaded from %s", name, entry["path"])
        for name in [n for n in self.adapters if n not in wanted]:
            del self.adapters[name], self.stamps[name]
        for internal in replaced:
            self.model.delete_adapter(internal)

    def served_models(self) -> list[str]:
        return list(self.adapters) + ([] if self.spec.serve.merge else [base_name(self.base)])

    # -- routes --------------------------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self, request: Request):
        # Probes carry no key and learn only that the replica is up; the served names are for callers with one.
        if not self._authorized(request):
            return {"status": "ok"}
        return {"status": "ok", "models": self.served_models()}

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        return openai_api.models_body(self.served_models())

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        body = await self._parse(request, openai_api.CompletionRequest)
        return await self._answer("text", body, body.prompt)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        self._authorize(request)
        body = await self._parse(request, openai_api.ChatRequest)
        return await self._answer("chat", body, openai_api.render_chat(body.messages,
                                                                      self.spec.prompt.inference_template))

    def _authorize(self, request: Request) -> None:
        if not self._authorized(request):
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_api_key",
                           kind="authentication_error")

    def _authorized(self, request: Request) -> bool:
        if self.key_hash is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        presented = hashlib.sha256(token.strip().encode()).hexdigest()
        return scheme.lower() == "bearer" and hmac.compare_digest(presented, self.key_hash)

    async def _parse(self, request: Request, schema):
        raw = await openai_api.read_body(request, self.spec.serve.max_request_bytes)
        return openai_api.parse(raw, schema, self.spec.serve)

    async def _job(self, body, prompt: str) -> Job:
        if body.model not in self.served_models():
            raise ApiError(404, f"model {body.model!r} does not exist; GET /v1/models lists the served models",
                           "model_not_found", param="model")
        settings = openai_api.settings_for(body, self.spec.generation, self.spec.serve.max_tokens_limit)
        measured = await asyncio.get_running_loop().run_in_executor(
            self.measuring, functools.partial(self.counter, prompt, add_special_tokens=False))
        ids = measured["input_ids"]
        if not ids:
            raise ApiError(400, "prompt is empty", "invalid_request")
        if len(ids) > self.spec.serve.max_prompt_tokens:
            raise ApiError(400, f"prompt is {len(ids)} tokens; this server accepts at most "
                                f"{self.spec.serve.max_prompt_tokens}", "context_length_exceeded")
        return Job(body.model, prompt, ids, settings, openai_api.stops(body))

    async def _answer(self, kind: str, body, prompt: str):
        job, rid, started = await self._job(body, prompt), openai_api.new_id(kind), time.monotonic()
        if body.stream:
            return StreamingResponse(self._stream(kind, rid, job, started), media_type="text/event-stream")
        request, done = self._submit(job)
        try:
            completion = await done
        finally:  # a client that went away frees its slot
            request.cancel()
        self._log(kind, job, completion, started, False)
        return openai_api.response_body(kind, rid, job.model, completion)

    async def _stream(self, kind: str, rid: str, job: Job, started: float):
        loop, deltas = asyncio.get_running_loop(), asyncio.Queue()
        request, done = self._submit(job, lambda delta: loop.call_soon_threadsafe(deltas.put_nowait, delta))
        # The engine queues every delta before it settles `done`, so None comes last.
        done.add_done_callback(lambda _: deltas.put_nowait(None))
        try:
            sent = ""
            while (delta := await deltas.get()) is not None:
                sent += delta
                yield openai_api.chunk_event(kind, rid, job.model, delta)
            if done.exception() is not None:
                log.error("stream %s failed: %r", rid, done.exception())
                error = done.exception()
                yield openai_api.error_event(error if isinstance(error, ApiError)
                                             else ApiError(500, "generation failed", None, "server_error"))
            else:
                completion = done.result()
                rest = completion.text[len(sent):]
                yield openai_api.chunk_event(kind, rid, job.model, rest, completion.finish_reason, completion)
                self._log(kind, job, completion, started, True)
            yield openai_api.DONE_EVENT
        finally:
            request.cancel()

    def _submit(self, job: Job, on_delta=None) -> tuple[engine.Request, asyncio.Future]:
        """Hand the job to the engine; the future settles on this event loop with its Completion."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        request = engine.Request(job.ids, job.settings, job.stops, job.model, on_delta,
                                 lambda result: loop.call_soon_threadsafe(self._settle, done, result))
        self.engine.submit(request)
        return request, done

    @staticmethod
    def _settle(done: asyncio.Future, result: Completion | BaseException) -> None:
        if done.done():  # the handler was cancelled
            return
        if isinstance(result, engine.UnknownAdapter):  # removed by a redeploy after the request was accepted
            result = ApiError(404, f"model {result.args[0]!r} is no longer served", "model_not_found")
        if isinstance(result, BaseException):
            done.set_exception(result)
        else:
            done.set_result(result)

    def _log(self, kind: str, job: Job, completion: Completion, started: float, stream: bool) -> None:
        # Never the prompt or the completion text: only sizes and timing.
        log.info("%s model=%s prompt_tokens=%d completion_tokens=%d finish=%s stream=%s %.0fms", kind, job.model,
                 completion.prompt_tokens, completion.completion_tokens, completion.finish_reason,
                 stream, 1000 * (time.monotonic() - started))


# ---------------------------------------------------------------------------------------------------------------
# What to serve, from the command line's arguments


def targets(spec_path: str | None, overrides: list[str], adapter_args: list[str],
            base: str | None) -> tuple[JobSpec, str, dict[str, str]]:
    """(settings, base, name -> adapter folder) from a job spec and/or NAME=PATH pairs.

    A job spec serves its run's tune winner (<run>/best/adapter) if there is one, else <run>/adapter, under
    output.name; without one, the settings come from the first adapter's run folder, except trust_remote_code
    (false unless an override sets it). `overrides` apply either way.
    """
    from ray_sft import spec as spec_module

    job, adapters = None, {}
    if spec_path:
        job = spec_module.load(spec_path, overrides)
        best = job.run_dir / "best" / "adapter"
        adapters[job.output.name] = str(best if best.is_dir() else job.run_dir / "adapter")
    for item in adapter_args:
        name, sep, path = item.partition("=")
        if not sep:
            raise ServeError(f"--adapter {item!r}: use NAME=PATH")
        adapters[name] = path
    if not adapters:
        raise ServeError("serve: give a job spec or --adapter NAME=PATH")
    bases = {base} if base else {generate.base_of(path) for path in adapters.values()}
    if len(bases) > 1:
        raise ServeError(f"serve: the adapters were trained on different bases {sorted(bases)}; pick one with --base")
    job = job or spec_module.with_overrides(generate.run_spec(next(iter(adapters.values()))), overrides)
    return job, bases.pop(), adapters

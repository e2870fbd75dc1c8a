"""The Serve app: one base model per replica with adapters on top, OpenAI-compatible routes, batching, auth, limits.

Read top-down: `start` brings up the HTTP proxy, `deploy` runs (or hot-swaps) an app built by `build_app`,
`ModelServer` is the replica. The served adapters live in a small named actor, the `AdapterRegistry`: every
replica watches it and loads changes in place, so deploying a new folder under a served name swaps it on every
replica without a restart and without failing in-flight requests (a Serve redeploy would restart replicas).
Imports neither `train` nor `tune`: adapters are loaded from the files train wrote.
"""

import asyncio
import contextlib
import copy
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
import ray
from ray import serve
from starlette.exceptions import HTTPException

from ray_sft import generate, modeling, openai_api
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
    # One adapter on a GPU merges: the dense model decodes with the static cache and CUDA graphs (the fast path).
    # Several adapters are switched per batch, which needs them unmerged; on CPU nothing is compiled and the 4-bit
    # base keeps the replica small.
    merge = (adapters == 1 and gpus > 0) if s.merge == "auto" else s.merge
    return with_values(spec, {"serve.gpus_per_replica": gpus, "serve.merge": merge})


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


def batch_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes a static-cache replica runs: powers of two, and the largest batch (one compiled graph each)."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return sizes + [max_batch_size]


def batch_rows(requests: int, max_batch_size: int) -> int:
    """The rows a batch of `requests` is padded to: the smallest of `batch_sizes` that holds them."""
    return next(size for size in batch_sizes(max_batch_size) if size >= requests)


@dataclass
class Job:
    """One request on its way through a batch."""

    model: str
    prompt: str
    prompt_tokens: int
    settings: GenerationSpec
    stops: list[str]
    stream: asyncio.Queue | None = None  # text deltas for a streaming request; None ends the stream
    loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)


class RowStreamer:
    """Receives each generation step's tokens for a whole batch and sends streaming rows their new text.

    Text is held back while it could still be cut by a stop string or ends in a partial UTF-8 character, so the
    streamed deltas always join to a prefix of the final text.
    """

    def __init__(self, tokenizer, jobs: list[Job]):
        self.tokenizer, self.jobs = tokenizer, jobs
        self.ids: list[list[int]] = [[] for _ in jobs]
        self.sent = ["" for _ in jobs]
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt ids
            self.prompt_seen = True
            return
        # A padded batch (see batch_rows) has rows beyond the jobs: those are not streamed.
        for row, token in enumerate(value.reshape(value.shape[0], -1)[: len(self.jobs), -1].tolist()):
            job, ids = self.jobs[row], self.ids[row]
            if job.stream is None or len(ids) >= job.settings.max_new_tokens or self.tokenizer.eos_token_id in ids:
                continue
            ids.append(token)
            self._send(row, self._safe_text(row))

    def end(self) -> None:
        """The final text and its end are sent by the request handler once the batch returns."""

    def _safe_text(self, row: int) -> str:
        text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
        stops = self.jobs[row].stops
        cut = generate.first_stop(text, stops)
        if cut is not None:
            return text[:cut]
        hold = max((len(s) - 1 for s in stops), default=0)
        return text[: len(text) - hold].rstrip("\ufffd")

    def _send(self, row: int, text: str) -> None:
        if len(text) > len(self.sent[row]) and text.startswith(self.sent[row]):
            delta, self.sent[row] = text[len(self.sent[row]):], text
            job = self.jobs[row]
            job.loop.call_soon_threadsafe(job.stream.put_nowait, delta)


api = FastAPI(title="ray_sft")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    return JSONResponse(openai_api.error_body(str(exc.detail), "invalid_request_error", str(exc.status_code)),
                        status_code=exc.status_code)


@serve.deployment
@serve.ingress(api)
class ModelServer:
    def __init__(self, base: str, spec: dict, key_hash: str | None, registry: str):
        import torch

        self.spec = from_dict(spec)
        self.base, self.key_hash = base, key_hash
        torch.set_num_threads(max(1, int(self.spec.serve.cpus_per_replica)))
        self.device = "cuda" if self.spec.serve.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
        # A merged replica builds its model from a fresh base when its adapter arrives (see _apply_adapters).
        self.tokenizer = modeling.load_tokenizer(base, self.spec.model)
        self.model = None if self.spec.serve.merge else modeling.load_model(base, self.spec, self.device, False)
        self.cache_len: int | None = None  # a merged model's static KV cache length (set with the model)
        # Requests are measured with a second tokenizer: a fast tokenizer used from two threads at once can fail
        # with "Already borrowed" while the generation thread pads a batch.
        self.counter = copy.deepcopy(self.tokenizer)
        self.adapters: dict[str, str] = {}  # served name -> internal peft adapter name
        self.stamps: dict[str, dict] = {}
        self.version = 0
        # Every model operation runs on this one thread: an adapter load never overlaps a forward pass.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batched.set_max_batch_size(self.spec.serve.max_batch_size)
        self.batched.set_batch_wait_timeout_s(self.spec.serve.batch_wait_timeout_s)
        self.registry = ray.get_actor(registry, namespace=REGISTRY_NAMESPACE)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._sync()  # the first adapters load before Serve marks the replica ready
        threading.Thread(target=self._watch, daemon=True, name="adapter-watch").start()

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
            self.pool.submit(self._apply_adapters, entries).result()
            self.version = version
        self.registry.ack.remote(self.replica_id, version)

    def _apply_adapters(self, wanted: dict[str, dict]) -> None:
        """Load new or changed adapters under fresh internal names, switch the served names over, then drop the
        replaced weights. Runs on the model thread, between batches."""
        changed = {n: e for n, e in wanted.items() if self.stamps.get(n) != e}
        if self.spec.serve.merge:
            if changed:
                (name, entry), = wanted.items()
                base_model = generate.load_base(self.base, self.spec, self.device)[1]
                self.model = generate.merged(base_model, entry["path"])
                self.cache_len = generate.static_cache_len(self.model, self.spec)
                self._warm_up()
                self.adapters, self.stamps = {name: "default"}, dict(wanted)
            return
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

    def _warm_up(self) -> None:
        """Decode once at every batch size a static-cache model will see, before the model serves: on CUDA each
        size compiles (tens of seconds), which no request should wait for."""
        if self.cache_len is None:
            return
        started, settings = time.monotonic(), dataclasses.replace(self.spec.generation, max_new_tokens=2)
        for rows in batch_sizes(self.spec.serve.max_batch_size):
            generate.complete(self.model, self.tokenizer, ["warm-up"], settings, rows=rows, cache_len=self.cache_len)
        log.info("static-cache decoder warmed up in %.1fs (cache length %d)", time.monotonic() - started,
                 self.cache_len)

    def served_models(self) -> list[str]:
        return list(self.adapters) + ([] if self.spec.serve.merge else [base_name(self.base)])

    @contextlib.contextmanager
    def _selected(self, model: str):
        if model in self.adapters and self.spec.serve.merge:
            yield
        elif model in self.adapters:
            self.model.set_adapter(self.adapters[model])
            yield
        elif model == base_name(self.base) and not self.spec.serve.merge:
            with self.model.disable_adapter():
                yield
        else:  # removed by a redeploy after the request was accepted
            raise ApiError(404, f"model {model!r} is no longer served", "model_not_found")

    # -- routes --------------------------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "models": self.served_models()}

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        return openai_api.models_body(self.served_models())

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        body = openai_api.parse(await request.body(), openai_api.CompletionRequest)
        return await self._answer("text", body, body.prompt)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        self._authorize(request)
        body = openai_api.parse(await request.body(), openai_api.ChatRequest)
        return await self._answer("chat", body, openai_api.render_chat(body.messages,
                                                                      self.spec.prompt.inference_template))

    def _authorize(self, request: Request) -> None:
        if self.key_hash is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        presented = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented, self.key_hash):
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_api_key",
                           kind="authentication_error")

    def _job(self, body, prompt: str) -> Job:
        if body.model not in self.served_models():
            raise ApiError(404, f"model {body.model!r} does not exist; GET /v1/models lists the served models",
                           "model_not_found")
        settings = openai_api.settings_for(body, self.spec.generation, self.spec.serve.max_tokens_limit)
        count = len(self.counter(prompt, add_special_tokens=False)["input_ids"])
        if count > self.spec.serve.max_prompt_tokens:
            raise ApiError(400, f"prompt is {count} tokens; this server accepts at most "
                                f"{self.spec.serve.max_prompt_tokens}", "context_length_exceeded")
        return Job(body.model, prompt, count, settings, openai_api.stops(body))

    async def _answer(self, kind: str, body, prompt: str):
        job, rid, started = self._job(body, prompt), openai_api.new_id(kind), time.monotonic()
        if body.stream:
            return StreamingResponse(self._stream(kind, rid, job, started), media_type="text/event-stream")
        completion = await self.batched(job)
        if isinstance(completion, ApiError):
            raise completion
        self._log(kind, job, completion, started)
        return openai_api.response_body(kind, rid, job.model, completion)

    async def _stream(self, kind: str, rid: str, job: Job, started: float):
        job.stream, job.loop = asyncio.Queue(), asyncio.get_running_loop()
        task = asyncio.ensure_future(self.batched(job))
        # Deltas are queued from the generation thread before the batch returns, so None comes last.
        task.add_done_callback(lambda _: job.stream.put_nowait(None))
        sent = ""
        while (delta := await job.stream.get()) is not None:
            sent += delta
            yield openai_api.chunk_event(kind, rid, job.model, delta)
        completion = task.result() if task.exception() is None else task.exception()
        if isinstance(completion, BaseException):
            log.error("stream %s failed: %r", rid, completion)
            error = completion if isinstance(completion, ApiError) else ApiError(500, "generation failed", None,
                                                                                 "server_error")
            yield openai_api.error_event(error)
        else:
            rest = completion.text[len(sent):]
            yield openai_api.chunk_event(kind, rid, job.model, rest, completion.finish_reason, completion)
            self._log(kind, job, completion, started)
        yield openai_api.DONE_EVENT

    def _log(self, kind: str, job: Job, completion: Completion, started: float) -> None:
        # Never the prompt or the completion text: only sizes and timing.
        log.info("%s model=%s prompt_tokens=%d completion_tokens=%d finish=%s stream=%s %.0fms", kind, job.model,
                 completion.prompt_tokens, completion.completion_tokens, completion.finish_reason,
                 job.stream is not None, 1000 * (time.monotonic() - started))

    # -- batching ------------------------------------------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def batched(self, jobs: list[Job]) -> list[Completion | ApiError]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._run_batch, jobs)

    def _run_batch(self, jobs: list[Job]) -> list[Completion | ApiError]:
        """Requests that share an adapter and sampling settings run as one generate() call.

        A group's request error is returned as its result, not raised: raising would fail the whole batch.
        """
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, job in enumerate(jobs):
            s = job.settings
            groups[(job.model, s.do_sample, s.temperature, s.top_p, s.repetition_penalty)].append(index)
        results: list[Completion | ApiError | None] = [None] * len(jobs)
        for (model, *_), indices in groups.items():
            members = [jobs[i] for i in indices]
            settings = dataclasses.replace(members[0].settings,
                                           max_new_tokens=max(j.settings.max_new_tokens for j in members))
            streamer = RowStreamer(self.tokenizer, members) if any(j.stream for j in members) else None
            try:
                with self._selected(model):
                    done = generate.complete(self.model, self.tokenizer, [j.prompt for j in members], settings,
                                             stops=[j.stops for j in members],
                                             limits=[j.settings.max_new_tokens for j in members], streamer=streamer,
                                             rows=batch_rows(len(members), self.spec.serve.max_batch_size)
                                             if self.cache_len else None, cache_len=self.cache_len)
            except ApiError as error:
                done = [error] * len(members)
            for index, completion in zip(indices, done):
                results[index] = completion
        return results


# ---------------------------------------------------------------------------------------------------------------
# What to serve, from the command line's arguments


def targets(spec_path: str | None, overrides: list[str], adapter_args: list[str],
            base: str | None) -> tuple[JobSpec, str, dict[str, str]]:
    """(settings, base, name -> adapter folder) from a job spec and/or NAME=PATH pairs.

    A job spec serves its run's tune winner (<run>/best/adapter) if there is one, else <run>/adapter, under
    output.name; without one, the settings come from the first adapter's run folder. `overrides` apply either way.
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
    bases = {generate.base_of(path) for path in adapters.values()}
    if base is None and len(bases) > 1:
        raise ServeError(f"serve: the adapters were trained on different bases {sorted(bases)}; pick one with --base")
    job = job or spec_module.with_overrides(generate.run_spec(next(iter(adapters.values()))), overrides)
    return job, base or bases.pop(), adapters

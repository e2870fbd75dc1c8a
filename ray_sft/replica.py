"""The Serve replica: one base model with adapters on top, behind OpenAI-compatible routes, auth and limits.

Every request is checked and measured here, then handed to the replica's decode engine (`engine`), which runs on
its own thread. The served adapters come from the app's registry (`registry`): the replica watches it and loads a
change in place, between two engine steps.
"""

import asyncio
import concurrent.futures
import contextvars
import copy
import functools
import hashlib
import hmac
import logging
import math
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
import ray
from ray import serve
from ray.serve._private import constants as serve_constants
from starlette.exceptions import HTTPException

from ray_sft import couplings, engine, generate, modeling, multi_lora, openai_api, registry
from ray_sft.generate import Completion
from ray_sft.openai_api import ApiError
from ray_sft.proxy import error_body
from ray_sft.spec import from_dict
from ray_sft.targets import base_name

# Serve routes this logger to the replica log files; another name would be dropped inside a replica.
log = logging.getLogger("ray.serve")

WATCH_INTERVAL_S = 0.5
# A registry that restarts answers within that (about a second here); one that does not is reported as unreachable
# (once), and a replica that starts meanwhile fails and is started again by Serve.
REGISTRY_TIMEOUT_S = 5
# Headers Serve's proxy obeys from any client, meant for a load balancer in front of it: the client's own timeout
# (0: none) and "?1" to keep a request decoding after its client has gone.
TIMEOUT_HEADER = couplings.require("ray", serve_constants, "SERVE_HTTP_REQUEST_TIMEOUT_S_HEADER")
KEEP_RUNNING_HEADER = couplings.require("ray", serve_constants, "SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER")


# No interactive docs or schema: they would describe the API to anyone who can reach it, key or not.
api = FastAPI(title="ray_sft", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error", str(exc.status_code)),
                        status_code=exc.status_code)


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception):
    # Even a bug answers in OpenAI's error shape (clients parse it); the traceback stays in the replica log.
    return JSONResponse(error_body("internal server error", "server_error", "internal_error"),
                        status_code=500)


# @serve.ingress pickles the app, this module's class with it, when the class is decorated: a module-level name the
# class uses must exist by then, so its helpers come first.


def _seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return math.nan


def _log(kind: str, request: engine.Request, completion: Completion, started: float) -> None:
    # Never the prompt or the completion text: only sizes and timing.
    log.info("%s model=%s prompt_tokens=%d completion_tokens=%d finish=%s stream=%s %.0fms", kind, request.adapter,
             completion.prompt_tokens, completion.completion_tokens, completion.finish_reason,
             request.on_delta is not None, 1000 * (time.monotonic() - started))


@serve.deployment
@serve.ingress(api)
class ModelServer:
    def __init__(self, base: str, spec: dict, key_hash: str | None, registry_name: str):
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
        self.version = 0  # of the registry's adapters this replica serves
        self.refused: tuple[int, str] | None = None  # the last version that failed to load here, and why
        # Every model operation runs on the engine's one thread, between decode steps: an adapter load never
        # overlaps a forward pass.
        self.engine = engine.Engine(self.tokenizer, self.spec.serve.max_batch_size,
                                    generate.longest_request(self.spec))
        threading.Thread(target=self.engine.serve_forever, daemon=True, name="model").start()
        self.registry_name = registry_name
        self.registry = registry.find(registry_name)
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
        reachable = True
        while True:
            time.sleep(WATCH_INTERVAL_S)
            try:
                if not reachable:  # a registry removed for good may since have been created anew under its name
                    self.registry = registry.find(self.registry_name)
                self._sync()
            except Exception as exc:  # the registry is down or restarting; the loaded adapters keep serving
                if reachable:
                    log.warning("adapter registry %s unreachable (%r): serving the loaded adapters (version %d) "
                                "until it is back", self.registry_name, exc, self.version)
                reachable = False
            else:
                if not reachable:
                    log.info("adapter registry %s reachable again (version %d)", self.registry_name, self.version)
                reachable = True

    def _sync(self) -> None:
        version, entries = ray.get(self.registry.snapshot.remote(), timeout=REGISTRY_TIMEOUT_S)
        if version not in (self.version, self.refused and self.refused[0]):
            self._load(version, entries)
        self.registry.ack.remote(self.replica_id, self.version, self.refused)

    def _load(self, version: int, entries: dict[str, dict]) -> None:
        try:
            self.engine.call(lambda: self._apply_adapters(entries)).result()
        except Exception as exc:
            if not self.version:
                raise  # nothing loaded yet: this replica has nothing to serve and fails to start
            # The driver hears of it through the registry and puts every replica back on the previous adapters.
            log.exception("adapters of version %d not loaded; still serving version %d", version, self.version)
            self.refused = (version, str(exc))
        else:
            self.version = version

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
        """All changed adapters load before any served name switches: a folder that fails leaves every name on
        what it served."""
        fresh = {name: f"a{uuid.uuid4().hex[:12]}" for name in changed}
        for name, entry in changed.items():
            try:
                self.model = generate.add_adapter(self.model, entry["path"], fresh[name])
            except Exception as exc:
                for internal in fresh.values():
                    if internal in getattr(self.model, "peft_config", {}):
                        self.model.delete_adapter(internal)
                raise RuntimeError(f"adapter {name} ({entry['path']}): {exc}") from exc
        replaced = [self.adapters[n] for n in self.adapters if n not in wanted or n in changed]
        for name, entry in changed.items():
            self.adapters[name], self.stamps[name] = fresh[name], entry
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
        self._check_headers(request)
        raw = await openai_api.read_body(request, self.spec.serve.max_request_bytes)
        return openai_api.parse(raw, schema, self.spec.serve)

    def _check_headers(self, request: Request) -> None:
        """The server's bounds are not a client's to lift, though Serve's proxy obeys these headers from anyone."""
        limit = self.spec.serve.request_timeout_s
        timeout = request.headers.get(TIMEOUT_HEADER)
        if timeout is not None and not 0 < _seconds(timeout) <= limit:
            raise ApiError(400, f"{TIMEOUT_HEADER}: a request may shorten its timeout, not lift it "
                                f"(serve.request_timeout_s: {limit:g} s)", "header_not_allowed", param=TIMEOUT_HEADER)
        if KEEP_RUNNING_HEADER in request.headers:
            raise ApiError(400, f"{KEEP_RUNNING_HEADER}: a request ends when its client goes away",
                           "header_not_allowed", param=KEEP_RUNNING_HEADER)

    async def _accept(self, body, prompt: str) -> engine.Request:
        """The request as the engine takes it, once its model, decoding fields and measured prompt are within
        bounds."""
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
        return engine.Request(ids, settings, openai_api.stops(body), body.model)

    async def _answer(self, kind: str, body, prompt: str):
        request, rid, started = await self._accept(body, prompt), openai_api.new_id(kind), time.monotonic()
        if body.stream:
            return StreamingResponse(self._stream(kind, rid, request, started), media_type="text/event-stream")
        done = self._submit(kind, request, started)
        try:
            completion = await done
        finally:  # a client that went away frees its slot
            request.cancel()
        return openai_api.response_body(kind, rid, request.adapter, completion)

    async def _stream(self, kind: str, rid: str, request: engine.Request, started: float):
        loop, deltas = asyncio.get_running_loop(), asyncio.Queue()
        request.on_delta = lambda delta: loop.call_soon_threadsafe(deltas.put_nowait, delta)
        done = self._submit(kind, request, started)
        # The engine queues every delta before it settles `done`, so None comes last.
        done.add_done_callback(lambda _: deltas.put_nowait(None))
        try:
            sent = ""
            while (delta := await deltas.get()) is not None:
                sent += delta
                yield openai_api.chunk_event(kind, rid, request.adapter, delta)
            if done.exception() is not None:
                log.error("stream %s failed: %r", rid, done.exception())
                error = done.exception()
                yield openai_api.error_event(error if isinstance(error, ApiError)
                                             else ApiError(500, "generation failed", None, "server_error"))
            else:
                completion = done.result()
                rest = completion.text[len(sent):]
                yield openai_api.chunk_event(kind, rid, request.adapter, rest, completion.finish_reason, completion)
            yield openai_api.DONE_EVENT
        finally:
            request.cancel()

    def _submit(self, kind: str, request: engine.Request, started: float) -> asyncio.Future:
        """Hand the request to the engine; the future settles on this event loop with its Completion."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        # Serve's request context (the request id its log lines carry) is a context variable of this handler's
        # task; the request settles in it even after the handler is gone.
        context = contextvars.copy_context()
        request.on_done = lambda result: loop.call_soon_threadsafe(self._settle, kind, request, started, done, result,
                                                                   context=context)
        self.engine.submit(request)
        return done

    @staticmethod
    def _settle(kind: str, request: engine.Request, started: float, done: asyncio.Future,
                result: Completion | BaseException) -> None:
        if isinstance(result, Completion):  # every end is logged: one cancelled by its client says what it cost
            _log(kind, request, result, started)
        if done.done():  # the handler was cancelled
            return
        if isinstance(result, engine.UnknownAdapter):  # removed by a redeploy after the request was accepted
            result = ApiError(404, f"model {result.args[0]!r} is no longer served", "model_not_found")
        if isinstance(result, BaseException):
            done.set_exception(result)
        else:
            done.set_result(result)


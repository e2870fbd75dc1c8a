"""`ray_sft.serve` and the replica (`ray_sft.replica`) over real HTTP: Serve on 127.0.0.1 in the session's private
Ray cluster, the tiny model, a trained adapter and a second (random) one. One main app is shared by most tests;
auth+merge, overload (a small queue) and autoscaling get their own apps on other route prefixes of the same Serve
instance. The failure tests kill the main app's replica and its adapter registry by PID and leave it serving."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import threading
import time
import uuid

import httpx
import pytest
import ray
from ray import serve

from ray_sft import cli, generate, registry, spec as rspec, targets
from ray_sft import serve as rs
from ray_sft.replica import REGISTRY_TIMEOUT_S
from tests.adapters import random_adapter
from tests.conftest import REPO, quick_spec, run_cli

PROMPT = "時間管理能力をあげるには?"
KEY_ENV = "RAY_SFT_TEST_API_KEY"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(ray_cluster, trained_run, tmp_path_factory):
    adapter = trained_run.adapter_dir
    spec = generate.run_spec(adapter)
    spec.serve.cpus_per_replica = 0.5  # leaves room for the autoscaling app's second replica on 2 CPUs
    # Short prompts, but the default max_tokens_limit: a long answer takes long enough to be cut short.
    spec.serve.max_prompt_tokens = 64
    spec.serve.request_timeout_s = 60  # more than any request here needs; the overload test checks none outlives it
    other_dir = tmp_path_factory.mktemp("other")
    other = random_adapter(quick_spec(other_dir), generate.base_of(adapter), other_dir, seed=7)
    url = rs.start("127.0.0.1", _free_port(), spec.serve.request_timeout_s)
    rs.deploy(spec, generate.base_of(adapter), {"trained": str(adapter), "other": str(other)})
    yield {"url": url, "spec": spec, "trained": adapter, "other": other, "base": generate.base_of(adapter)}
    for app in list(serve.status().applications):
        rs.stop(app)
    serve.shutdown()


@pytest.fixture(scope="module")
def client(setup):
    with httpx.Client(base_url=setup["url"], timeout=120) as c:
        yield c


def complete(client, model="trained", prefix="", headers=None, **fields):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 24, **fields}
    r = client.post(f"{prefix}/v1/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def chat(client, messages, **fields):
    r = client.post("/v1/chat/completions", json={"model": "trained", "messages": messages, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def stream_events(client, path, body, headers=None) -> list:
    with client.stream("POST", path, json={**body, "stream": True}, headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_models_and_health(client, setup):
    names = ["trained", "other", targets.base_name(setup["base"])]
    assert sorted(m["id"] for m in client.get("/v1/models").json()["data"]) == sorted(names)
    assert client.get("/healthz").json()["status"] == "ok"


def test_completion_and_chat_equal_local_generate(client, setup, capsys):
    """A completion of the rendered prompt and a one-message chat both equal `ray-sft generate`."""
    assert cli.main(["generate", "--adapter", str(setup["trained"]), "--max-new-tokens", "24", PROMPT]) == 0
    expected = capsys.readouterr().out.removesuffix("\n")
    rendered = generate.prompt_for(PROMPT, setup["spec"])
    body = complete(client, prompt=rendered)
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == expected
    answer = chat(client, [{"role": "user", "content": PROMPT}], max_tokens=24)
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"] == expected
    tokens = len(setup_tokenizer(setup)(rendered, add_special_tokens=False)["input_ids"])
    assert answer["usage"] == {"prompt_tokens": tokens, "completion_tokens": 24, "total_tokens": tokens + 24}
    assert answer["choices"][0]["finish_reason"] == "length"


def setup_tokenizer(setup):
    from ray_sft import modeling

    return modeling.load_tokenizer(setup["base"], setup["spec"].model)


def test_system_message_is_rendered_before_the_instruction(client):
    plain = chat(client, [{"role": "user", "content": PROMPT}], max_tokens=8)
    with_system = chat(client, [{"role": "system", "content": "丁寧に答えてください。"},
                                {"role": "user", "content": PROMPT}], max_tokens=8)
    assert with_system["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]


def test_adapters_differ_and_base_matches_plain_generate(client, setup):
    rendered = generate.prompt_for(PROMPT, setup["spec"])
    texts = {m: complete(client, model=m, prompt=rendered)["choices"][0]["text"]
             for m in ("trained", "other", targets.base_name(setup["base"]))}
    tokenizer, base = generate.load_base(setup["base"], setup["spec"])
    plain = generate.complete(base, tokenizer, [rendered], generate.with_overrides(setup["spec"].generation,
                                                                                   max_new_tokens=24))[0].text
    assert texts[targets.base_name(setup["base"])] == plain
    assert texts["other"] != texts["trained"] and texts["other"] != plain


@pytest.mark.parametrize("path,body_key", [("/v1/completions", "text"), ("/v1/chat/completions", "chat")])
def test_streaming_chunks_join_to_the_full_text(client, path, body_key):
    body = {"model": "other", "max_tokens": 32}
    body.update({"prompt": PROMPT} if body_key == "text" else {"messages": [{"role": "user", "content": PROMPT}]})
    full = client.post(path, json=body).json()
    events = stream_events(client, path, body)
    pieces = [e["choices"][0]["text"] if body_key == "text" else e["choices"][0]["delta"]["content"] for e in events]
    expected = full["choices"][0]["text"] if body_key == "text" else full["choices"][0]["message"]["content"]
    assert "".join(pieces) == expected
    assert sum(bool(p) for p in pieces) > 2  # streamed as it was generated, not in one piece
    assert events[-1]["choices"][0]["finish_reason"] == "length" and events[-1]["usage"] == full["usage"]
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def test_decoding_fields_are_honoured(client):
    full = complete(client, max_tokens=30)["choices"][0]["text"]
    short = complete(client, max_tokens=5)
    assert short["usage"]["completion_tokens"] == 5 and full.startswith(short["choices"][0]["text"])
    stop = full[10:12]
    stopped = complete(client, max_tokens=30, stop=[stop])["choices"][0]
    assert stopped["text"] == full[: full.index(stop)] and stopped["finish_reason"] == "stop"
    assert complete(client, max_tokens=30, repetition_penalty=1.0)["choices"][0]["text"] != full
    samples = [complete(client, max_tokens=30, temperature=1.5, top_p=0.9) for _ in range(3)]
    assert all(1 <= s["usage"]["completion_tokens"] <= 30 for s in samples)  # a draw may end at EOS
    texts = {s["choices"][0]["text"] for s in samples}
    assert len(texts) >= 2 and full not in texts  # drawn at random, not greedy
    # A nucleus of one token leaves only the most likely one: greedy's text, after the same repetition penalty.
    assert complete(client, max_tokens=30, temperature=1.0, top_p=1e-6)["choices"][0]["text"] == full


BAD = [
    ("malformed json", "/v1/completions", b'{"model": "trained", ', 400, "invalid_json"),
    ("missing prompt", "/v1/completions", {"model": "trained"}, 400, "invalid_request"),
    ("missing model", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400,
     "invalid_request"),
    ("wrong type", "/v1/completions", {"model": "trained", "prompt": "x", "temperature": "hot"}, 400,
     "invalid_request"),
    ("bad role", "/v1/chat/completions", {"model": "trained", "messages": [{"role": "tool", "content": "x"}]}, 400,
     "invalid_request"),
    ("no user last", "/v1/chat/completions",
     {"model": "trained", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     400, "invalid_messages"),
    ("unknown model", "/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model_not_found"),
    ("path as model", "/v1/completions", {"model": "/etc", "prompt": "x"}, 404, "model_not_found"),
    ("prompt too long", "/v1/completions", {"model": "trained", "prompt": "時間" * 200}, 400,
     "context_length_exceeded"),
    ("max_tokens over cap", "/v1/completions", {"model": "trained", "prompt": "x", "max_tokens": 513}, 400,
     "max_tokens_exceeded"),
    ("n > 1", "/v1/completions", {"model": "trained", "prompt": "x", "n": 2}, 400, "invalid_request"),
    ("too many stops", "/v1/completions", {"model": "trained", "prompt": "x", "stop": ["a"] * 5}, 400,
     "too_many_stops"),
    ("200,000 stops", "/v1/completions", {"model": "trained", "prompt": "x", "stop": ["a"] * 200_000}, 400,
     "too_many_stops"),
    ("stop too long", "/v1/completions", {"model": "trained", "prompt": "x", "stop": "a" * 257}, 400,
     "stop_too_long"),
    ("too many messages", "/v1/chat/completions",
     {"model": "trained", "messages": [{"role": "user", "content": "x"}] * 257}, 400, "too_many_messages"),
    ("deep json", "/v1/completions", b'{"model": "trained", "prompt": "x", "user": ' + b"[" * 20 + b"]" * 20 + b"}",
     400, "json_too_deep"),
    ("deeper than the parser", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, "json_too_deep"),
]
PARAM = {"too_many_stops": "stop", "stop_too_long": "stop", "too_many_messages": "messages",
         "json_too_deep": "body", "max_tokens_exceeded": "max_tokens", "model_not_found": "model"}


@pytest.mark.parametrize("why,path,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(client, why, path, body, status, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == PARAM.get(code, error["param"])  # the field at fault


def test_a_12mb_body_is_refused_at_once_while_healthz_answers(setup):
    huge = json.dumps({"model": "trained", "prompt": "時間" * 2_000_000}).encode()
    assert len(huge) > 12_000_000
    chunks = [huge[i:i + 65536] for i in range(0, len(huge), 65536)]
    results, health = [], []

    def post(content):
        with httpx.Client(base_url=setup["url"], timeout=30) as c:
            started = time.monotonic()
            r = c.post("/v1/completions", content=content, headers={"content-type": "application/json"})
            results.append((r.status_code, r.json()["error"], time.monotonic() - started))

    # Declared (Content-Length) and chunked (no length: counted as it arrives).
    posts = [threading.Thread(target=post, args=(body,)) for body in (huge, iter(chunks))]
    with httpx.Client(base_url=setup["url"], timeout=30) as c:
        for thread in posts:
            thread.start()
        while any(thread.is_alive() for thread in posts):
            started = time.monotonic()
            health.append((c.get("/healthz").status_code, time.monotonic() - started))
    for thread in posts:
        thread.join()
    assert [(status, error["code"], error["param"]) for status, error, _ in results] == \
        [(413, "request_too_large", "body")] * 2
    assert max(elapsed for *_, elapsed in results) < 1, results
    assert health and all(status == 200 and elapsed < 1 for status, elapsed in health), health


def test_unknown_route_and_method_get_openai_errors(client):
    assert client.get("/v1/nothing").json()["error"]["code"] == "404"
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    assert client.get("/healthz").status_code == 200  # the replica survived every bad request


def test_32_concurrent_requests_batch_and_match_one_by_one(client):
    prompts = ["猫", "水", PROMPT, "日本で一番高い山は?"]
    jobs = [(m, p) for m in ("trained", "other") for p in prompts] * 4
    alone = {(m, p): complete(client, model=m, prompt=p)["choices"][0]["text"] for m, p in set(jobs)}
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda job: complete(client, model=job[0], prompt=job[1]), jobs))
    assert len(results) == 32
    assert [r["choices"][0]["text"] for r in results] == [alone[job] for job in jobs]


def test_overload_is_shed_with_503_and_every_request_ends_within_the_timeout(setup):
    """More concurrent requests than a replica (2 x its slots) and Serve's queue hold, on an app of 2 slots and a
    queue of 2 (the main app's must hold the 32 concurrent requests above): each ends before the proxy's timeout,
    200 or a 503 with Retry-After; each 200 stopped at its own max_tokens, beside a row with another limit."""
    spec = rspec.with_overrides(setup["spec"], ["serve.max_batch_size=2", "serve.max_queued_requests=2"])
    rs.deploy(spec, setup["base"], {"trained": str(setup["trained"])}, name="tight", route_prefix="/tight")
    s = spec.serve
    count = 4 * (2 * s.max_batch_size + s.max_queued_requests)
    ready = threading.Barrier(count)

    def post(index: int):
        max_tokens = 64 - index % 4
        with httpx.Client(base_url=setup["url"], timeout=2 * s.request_timeout_s) as c:
            ready.wait()
            started = time.monotonic()
            r = c.post("/tight/v1/completions", json={"model": "trained", "prompt": PROMPT, "max_tokens": max_tokens})
            return max_tokens, r, time.monotonic() - started

    try:
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            results = list(pool.map(post, range(count)))
    finally:
        rs.stop("tight")
    assert {r.status_code for _, r, _ in results} == {200, 503}
    assert max(elapsed for *_, elapsed in results) < s.request_timeout_s
    for max_tokens, r, _ in results:
        if r.status_code == 503:  # Serve's own answer, with its Retry-After, in OpenAI's shape (ray_sft.proxy)
            assert r.headers["retry-after"] == str(s.retry_after_s)
            assert r.json()["error"]["code"] == "overloaded" and "backpressure" in r.json()["error"]["message"]
        else:
            completion = r.json()
            assert (completion["usage"]["completion_tokens"] == max_tokens
                    or completion["choices"][0]["finish_reason"] == "stop")


def _logged_ends(capfd, request_ids: list[str], timeout_s: float = 30) -> dict[str, dict]:
    """request id -> the fields of the replica's log line for that request's end. A replica logs to stderr too, and
    Ray prints its workers' output on the driver's (this process's) stderr."""
    ends, deadline = {}, time.monotonic() + timeout_s
    while len(ends) < len(request_ids) and time.monotonic() < deadline:
        time.sleep(0.5)
        for line in capfd.readouterr().err.splitlines():
            ends.update({request_id: dict(part.split("=", 1) for part in line.split() if "=" in part)
                         for request_id in request_ids if request_id in line and "completion_tokens=" in line})
    assert len(ends) == len(request_ids), f"the replica logged no end of {set(request_ids) - set(ends)}"
    return ends


def test_a_request_whose_client_is_gone_stops_decoding(setup, client, capfd):
    """A stream closed after its first chunk, a request its client gave up on and one past its timeout: the engine
    ends each well before max_tokens (the replica's log line for the request id says how many tokens it decoded)."""
    limit = setup["spec"].serve.max_tokens_limit
    body = {"model": "trained", "prompt": PROMPT, "max_tokens": limit}
    ids = {how: f"{how}-{uuid.uuid4().hex}" for how in ("stream", "gave-up", "timeout")}
    with client.stream("POST", "/v1/completions", json={**body, "stream": True},
                       headers={"x-request-id": ids["stream"]}) as r:
        next(r.iter_lines())
    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/completions", json=body, headers={"x-request-id": ids["gave-up"]}, timeout=0.5)
    r = client.post("/v1/completions", json=body,
                    headers={"x-request-id": ids["timeout"], "x-request-timeout-seconds": "0.5"})
    assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
    ends = _logged_ends(capfd, list(ids.values()))
    assert all(e["finish"] == "cancelled" and int(e["completion_tokens"]) < limit / 2 for e in ends.values()), ends


@pytest.mark.parametrize("header,value", [("x-request-timeout-seconds", "0"), ("x-request-timeout-seconds", "3600"),
                                          ("x-request-disconnect-disabled", "?1")])
def test_a_client_cannot_lift_the_servers_bounds(client, header, value):
    """Serve's proxy obeys these headers from anyone (no timeout; decoding on after the client is gone)."""
    r = client.post("/v1/completions", json={"model": "trained", "prompt": "x", "max_tokens": 1},
                    headers={header: value})
    assert r.status_code == 400 and (r.json()["error"]["code"], r.json()["error"]["param"]) == ("header_not_allowed",
                                                                                                header)


def test_invalid_serving_setups_are_refused(setup):
    with pytest.raises(targets.ServeError, match="invalid adapter name"):
        rs.deploy(setup["spec"], setup["base"], {"../x": str(setup["other"])}, name="bad")
    with pytest.raises(targets.ServeError, match="not an adapter folder"):
        rs.deploy(setup["spec"], setup["base"], {"x": str(setup["other"].parent)}, name="bad")
    merged = rspec.with_overrides(setup["spec"], ["serve.merge=true"])
    with pytest.raises(targets.ServeError, match="serve.merge: a merged model serves exactly one adapter"):
        rs.deploy(merged, setup["base"], {"a": str(setup["trained"]), "b": str(setup["other"])}, name="bad")
    assert "bad" not in serve.status().applications


def test_api_key_and_merged_model(client, setup, monkeypatch):
    """A second app with a key and serve.merge: 401 without the right key; same greedy text as the 4-bit adapter."""
    monkeypatch.setenv(KEY_ENV, "s3cret")
    spec = generate.run_spec(setup["trained"])
    spec.serve.cpus_per_replica, spec.serve.merge, spec.serve.api_key_env = 0.5, True, KEY_ENV
    rs.deploy(spec, setup["base"], {"trained": str(setup["trained"])}, targets.api_key(spec, "127.0.0.1"),
              name="secure", route_prefix="/secure")
    try:
        body = {"model": "trained", "prompt": PROMPT, "max_tokens": 24}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = client.post("/secure/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert client.get("/secure/v1/models").status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert client.get("/secure/healthz").json() == {"status": "ok"}  # a probe learns nothing more
        assert client.get("/secure/healthz", headers=good).json()["models"] == ["trained"]
        for path in ("/secure/docs", "/secure/redoc", "/secure/openapi.json", "/docs", "/openapi.json"):
            r = client.get(path, headers=good)
            assert r.status_code == 404 and r.json()["error"], path
        models = client.get("/secure/v1/models", headers=good).json()["data"]
        assert [m["id"] for m in models] == ["trained"]  # a merged replica has no bare base to offer
        merged = complete(client, prefix="/secure", headers=good)["choices"][0]["text"]
        assert merged == complete(client)["choices"][0]["text"]
        # Concurrent requests on the merged replica's engine, some of them streamed, get the text each gets alone.
        prompts = ["猫", "水", PROMPT]
        alone = [complete(client, prefix="/secure", headers=good, prompt=p)["choices"][0]["text"] for p in prompts]

        def streamed(prompt):
            events = stream_events(client, "/secure/v1/completions", {**body, "prompt": prompt}, good)
            return "".join(e["choices"][0]["text"] for e in events)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            plain = pool.map(lambda p: complete(client, prefix="/secure", headers=good, prompt=p), prompts)
            streams = pool.map(streamed, prompts)
            assert [r["choices"][0]["text"] for r in plain] == alone == list(streams)
    finally:
        rs.stop("secure")


def _load(client, model: str, stop: threading.Event, results: list) -> None:
    while not stop.is_set():
        r = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 16})
        results.append(r.status_code)


def test_hot_swap_under_load_loses_no_request(client, setup):
    before = complete(client, model="other")["choices"][0]["text"]
    trained_text = complete(client, model="trained")["choices"][0]["text"]
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(client, "other", stop, results)) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        # "other" now serves the trained adapter's folder; the replica is updated in place.
        rs.deploy(setup["spec"], setup["base"], {"trained": str(setup["trained"]), "other": str(setup["trained"])})
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert results and set(results) == {200}
    assert complete(client, model="other")["choices"][0]["text"] == trained_text != before
    rs.deploy(setup["spec"], setup["base"], {"trained": str(setup["trained"]), "other": str(setup["other"])})
    assert complete(client, model="other")["choices"][0]["text"] == before


def _running_replicas(app: str) -> int:
    return serve.status().applications[app].deployments["ModelServer"].replica_states.get("RUNNING", 0)


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_autoscaling_goes_to_two_replicas_under_load_and_back(client, setup):
    spec = generate.run_spec(setup["trained"])
    spec.serve.cpus_per_replica = 0.5
    a = spec.serve.autoscaling
    a.min_replicas, a.max_replicas, a.target_ongoing_requests = 1, 2, 1
    a.upscale_delay_s, a.downscale_delay_s, a.look_back_period_s = 1, 3, 11  # look-back must exceed 10 s
    rs.deploy(spec, setup["base"], {"trained": str(setup["trained"])}, name="scale", route_prefix="/scale")
    stop, results = threading.Event(), []
    load = lambda: [client.post("/scale/v1/completions",  # noqa: E731
                                json={"model": "trained", "prompt": PROMPT, "max_tokens": 48}).status_code
                    for _ in iter(lambda: stop.is_set(), True)]
    threads = [threading.Thread(target=lambda: results.extend(load())) for _ in range(6)]
    try:
        assert _running_replicas("scale") == 1
        for t in threads:
            t.start()
        assert _wait_for(lambda: _running_replicas("scale") == 2, timeout_s=120), "never scaled up"
    finally:
        stop.set()
        for t in threads:
            t.join()
    try:
        assert set(results) == {200}
        assert _wait_for(lambda: _running_replicas("scale") == 1, timeout_s=90), "never scaled back down"
    finally:
        rs.stop("scale")


# ---------------------------------------------------------------------------------------------------------------
# failures: processes killed by PID, a broken adapter


def _alive_pid(**fields) -> int | None:
    """The PID of the live actor whose GCS record has these fields (Name, ActorClassName), if there is one."""
    from ray._private import state  # the GCS's actor table: the state API would need the dashboard

    pids = [a["Pid"] for a in state.actors(actor_state_name="ALIVE").values()
            if all(a[k] == v for k, v in fields.items()) and a["Pid"]]
    return pids[0] if pids else None


MAIN_REPLICA = {"ActorClassName": f"ServeReplica:{rs.APP_NAME}:ModelServer"}
MAIN_REGISTRY = {"Name": registry.name_of(rs.APP_NAME)}


def _post(url: str, model: str, timeout_s: float) -> int | str:
    """200, or "STATUS CODE" (the JSON error's code, "text" for any other body), or the client's error."""
    with httpx.Client(base_url=url, timeout=timeout_s) as c:
        try:
            r = c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 96})
        except httpx.HTTPError as exc:
            return type(exc).__name__
    if r.status_code == 200:
        return 200
    is_json = r.headers.get("content-type") == "application/json"
    return f"{r.status_code} {r.json()['error']['code'] if is_json else 'text'}"


def _stream_end(url: str, model: str, timeout_s: float) -> tuple[str, float]:
    """How a long streamed answer ended ("done": [DONE] came; "cut": closed without it, or mid-chunk, which httpx
    reports as RemoteProtocolError; else the status or the client's error) and when (monotonic)."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 512, "stream": True}
    with httpx.Client(base_url=url, timeout=timeout_s) as c:
        try:
            with c.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return str(r.status_code), time.monotonic()
                lines = [line for line in r.iter_lines() if line]
            how = "done" if lines[-1:] == ["data: [DONE]"] else "cut"
        except httpx.RemoteProtocolError:
            how = "cut"
        except httpx.HTTPError as exc:
            how = type(exc).__name__
    return how, time.monotonic()


@pytest.mark.slow
def test_a_killed_replica_ends_every_request_and_is_replaced(client, setup):
    """SIGKILL on the main app's replica during 4 long streams and 32 concurrent requests: each ends, none hangs
    (those the replica held with a JSON 503 or a cut stream, the queued ones on the new replica), and a new replica
    answers within 60 s."""
    pid, limit = _alive_pid(**MAIN_REPLICA), setup["spec"].serve.request_timeout_s
    assert pid
    with concurrent.futures.ThreadPoolExecutor(36) as pool:
        streams = [pool.submit(_stream_end, setup["url"], "trained", 2 * limit) for _ in range(4)]
        posted = [pool.submit(_post, setup["url"], ("trained", "other")[i % 2], 2 * limit) for i in range(32)]
        time.sleep(2)  # the streams are decoding at the replica, every other request there or queued before it
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        ended = [f.result() for f in posted]
        stream_ends = [f.result() for f in streams]
    # A request its replica died under gets ray_sft.proxy's JSON 503; the kill landed while some were there. (A
    # request past the proxy's queue would get Serve's backpressure 503, in the same JSON shape.)
    assert all(code in (200, "503 replica_lost", "503 overloaded") for code in ended), ended
    assert "503 replica_lost" in ended, ended
    # A stream the replica died under is closed at once (no [DONE]), not left open until the request's timeout; one
    # still queued at the proxy then streams whole from the new replica.
    assert "cut" in [how for how, _ in stream_ends], stream_ends
    assert all(how in ("done", "cut") and at - killed < (10 if how == "cut" else limit) for how, at in stream_ends), \
        (stream_ends, killed)
    assert _wait_for(lambda: _post(setup["url"], "other", 10) == 200, 60 - (time.monotonic() - killed))
    assert _alive_pid(**MAIN_REPLICA) not in (None, pid)


@pytest.mark.slow
def test_a_killed_registry_restarts_and_replicas_keep_serving(client, setup, capfd):
    """The adapter registry under load, SIGSTOPped past the replicas' timeout, then SIGKILLed: Ray restarts it with
    what was published, every request is a 200, each replica logs once that it is unreachable and once that it is
    back, and a hot swap through the restarted registry works."""
    pid, before = _alive_pid(**MAIN_REGISTRY), complete(client, model="other")["choices"][0]["text"]
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(client, m, stop, results)) for m in ("trained", "other") * 2]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(REGISTRY_TIMEOUT_S + 2)  # every replica's poll times out, then polls again (and again)
        os.kill(pid, signal.SIGKILL)
        assert _wait_for(lambda: _alive_pid(**MAIN_REGISTRY) not in (None, pid), 30), "the registry never restarted"
        time.sleep(2)  # load on the replicas after the restart, too
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert results and set(results) == {200}
    trained_text = complete(client, model="trained")["choices"][0]["text"]
    try:
        rs.deploy(setup["spec"], setup["base"], {"trained": str(setup["trained"]), "other": str(setup["trained"])})
        assert complete(client, model="other")["choices"][0]["text"] == trained_text
    finally:
        rs.deploy(setup["spec"], setup["base"], {"trained": str(setup["trained"]), "other": str(setup["other"])})
    assert complete(client, model="other")["choices"][0]["text"] == before
    logged, replicas = capfd.readouterr().err, _running_replicas(rs.APP_NAME)
    assert (logged.count("unreachable"), logged.count("reachable again")) == (replicas, replicas), logged


def _broken_copy(adapter, out, fault: str):
    """A copy of the adapter folder with one fault: a tensor of the wrong shape, or targets the base lacks."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    if fault == "shapes":
        weights = load_file(out / "adapter_model.safetensors")
        key = next(k for k in weights if "lora_A" in k)
        weights[key] = weights[key][:, :-1].contiguous()
        save_file(weights, out / "adapter_model.safetensors")
    else:
        config = json.loads((out / "adapter_config.json").read_text())
        config["target_modules"] = ["no_such_proj"]
        (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_a_hot_swap_to_a_broken_adapter_is_refused_and_the_old_one_served(client, setup, tmp_path, capsys):
    """A folder whose tensors do not fit the base (through `ray-sft serve`: exit 2) or whose targets it lacks
    (through serve.deploy): refused before any replica switches, with the reason; the old adapter still answers."""
    before = complete(client, model="other")["choices"][0]["text"]
    published = ray.get(registry.open_for(rs.APP_NAME).snapshot.remote())
    shapes = _broken_copy(setup["other"], tmp_path / "shapes", "shapes")
    code, _ = run_cli("serve", "--adapter", f"trained={setup['trained']}", "--adapter", f"other={shapes}",
                      "--port", setup["url"].rsplit(":", 1)[1])
    error = capsys.readouterr().err
    assert code == 2 and f"adapter other ({shapes}) does not fit the base" in error and "size mismatch" in error
    with pytest.raises(targets.ServeError, match=r"adapter other \(.*\) does not fit the base .*targeted"):
        rs.deploy(setup["spec"], setup["base"],
                  {"trained": str(setup["trained"]), "other": str(_broken_copy(setup["other"], tmp_path / "t", "t"))})
    assert ray.get(registry.open_for(rs.APP_NAME).snapshot.remote()) == published  # no replica was told to switch
    assert complete(client, model="other")["choices"][0]["text"] == before


# ---------------------------------------------------------------------------------------------------------------
# serve's "auto" settings (nothing deployed)

GPU_SPECS = sorted(REPO.glob("jobs/llm-jp-3-1.8b-dolly-ja*.yaml"))


@pytest.mark.parametrize("cluster,adapters,expected", [
    ({"CPU": 2.0}, 1, (0, False, 8)),  # no GPU: CPU replica, 4-bit base + adapter, few slots
    ({"CPU": 16.0, "GPU": 0.0}, 1, (0, False, 8)),
    ({"CPU": 16.0, "GPU": 1.0}, 1, (1, True, 32)),  # one adapter on a GPU: merged, the static-cache fast path
    ({"CPU": 16.0, "GPU": 8.0}, 2, (1, False, 32)),  # several adapters stay switchable per batch
])
def test_auto_resolves_from_the_cluster_and_the_adapter_count(cluster, adapters, expected):
    served = rs.resolve(rspec.from_dict({}), adapters, cluster).serve
    assert (served.gpus_per_replica, served.merge, served.max_batch_size) == expected


@pytest.mark.parametrize("overrides,cluster,expected", [
    (["serve.gpus_per_replica=0"], {"GPU": 1.0}, (0, False)),  # pinned to CPU
    (["serve.merge=false"], {"GPU": 1.0}, (1, False)),
    (["serve.merge=true"], {"CPU": 2.0}, (0, True)),
    (["serve.gpus_per_replica=0.5"], {}, (0.5, True)),
    (["serve.max_batch_size=3"], {"GPU": 1.0}, (1, True)),
])
def test_explicit_serve_values_are_kept(overrides, cluster, expected):
    served = rs.resolve(rspec.with_overrides(rspec.from_dict({}), overrides), 1, cluster).serve
    assert (served.gpus_per_replica, served.merge) == expected
    assert served.max_batch_size == (3 if "serve.max_batch_size=3" in overrides else
                                     32 if served.gpus_per_replica else 8)


@pytest.mark.parametrize("path", GPU_SPECS, ids=lambda p: p.name)
def test_shipped_gpu_specs_serve_merged_on_a_gpu(path):
    served = rs.resolve(rspec.load(path), 1, {"CPU": 8.0, "GPU": 1.0}).serve
    assert (served.gpus_per_replica, served.merge) == (1, True)


def test_defaults_resolve_for_the_real_cluster(ray_cluster, tmp_path):
    """On the test cluster (no GPU on a CPU machine) the defaults give a CPU replica serving the 4-bit base."""
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    served = rs.replica_spec(quick_spec(tmp_path), {"one": "unused"}).serve
    assert (served.gpus_per_replica, served.merge, served.max_batch_size) == ((1, True, 32) if has_gpu else
                                                                              (0, False, 8))

"""ray_sft.proxy: the HTTP proxy's answer for a request Serve lost (the real proxy under a killed replica:
tests/test_serve.py::test_a_killed_replica_ends_every_request_and_is_replaced)."""

from __future__ import annotations

import asyncio
import json

from ray_sft import cluster, proxy
from tests.conftest import REPO


def _call(app, scope_type: str = "http") -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(proxy.JsonServeAnswers(app)({"type": scope_type}, receive, send))
    return sent


def test_a_request_the_proxy_did_not_answer_gets_a_json_503():
    async def lost(scope, receive, send):  # what Serve's proxy does when the replica died under the request
        return None

    start, body = _call(lost)
    assert start["status"] == 503 and (b"content-type", b"application/json") in start["headers"]
    assert json.loads(body["body"]) == proxy.error_body(proxy.LOST, "server_error", "replica_lost")


def test_serves_own_plain_text_answers_become_json_with_their_headers():
    async def shed(scope, receive, send):  # Serve's backpressure answer, as its proxy sends it
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"19"),
                                (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": b"Request dropped due", "more_body": True})
        await send({"type": "http.response.body", "body": b" to backpressure."})

    start, body = _call(shed)
    assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
    assert (b"content-type", b"application/json") in start["headers"] and (b"content-length", b"19") not in start[
        "headers"]
    assert json.loads(body["body"]) == proxy.error_body("Request dropped due to backpressure.", "server_error",
                                                        "overloaded")
    assert dict(start["headers"])[b"content-length"] == str(len(body["body"])).encode()


def test_a_json_error_from_a_replica_passes_unchanged():
    async def replica(scope, receive, send):
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"error": {}}'})

    assert [m.get("body") for m in _call(replica)] == [None, b'{"error": {}}']


def test_an_answered_request_passes_unchanged():
    async def answered(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok", "more_body": True})
        # a stream cut here (the replica died mid-answer) keeps its 200: the status is already sent

    assert [m.get("status") for m in _call(answered)] == [200, None] and _call(answered)[1]["body"] == b"ok"


def test_other_protocols_pass_through():
    async def silent(scope, receive, send):
        return None

    assert _call(silent, "websocket") == [] and _call(silent, "lifespan") == []


def test_the_callback_is_what_ray_loads_and_returns_starlette_middleware():
    from ray.serve._private.http_util import validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    assert cluster.EMBEDDED_RAY_ENV["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == proxy.CALLBACK
    loaded = validate_http_proxy_callback_return(call_function_from_import_path(proxy.CALLBACK))
    assert [m.cls for m in loaded] == [proxy.JsonServeAnswers]
    # A joined cluster's proxies get it from the image every cluster config uses.
    assert f"ENV RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH={proxy.CALLBACK}" in (
        REPO / "cluster" / "Dockerfile").read_text().splitlines()

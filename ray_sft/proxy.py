"""What ray_sft adds to Ray Serve's HTTP proxy (one per node, shared by every app): JSON for the answers Serve makes.

ray_sft's replicas answer every error in OpenAI's JSON shape; Serve's proxy answers some requests itself, before or
instead of a replica, in plain text. When a replica dies holding a request the proxy sends nothing for it and uvicorn
then answers a plain-text 500: such a request was lost inside Serve, and gets a JSON 503 instead, which clients retry
(OpenAI's clients retry a 503 by themselves). Serve's backpressure 503 and timeout 408 get the same JSON shape. A
response already under way (a stream cut by the kill or the timeout) cannot change; its client sees the stream end
without `[DONE]`.

Ray loads this through RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, which the clusters ray_sft starts itself set
(`cluster.EMBEDDED_RAY_ENV`), as does cluster/Dockerfile. It runs in the proxy's process, which must import it: so
nothing here imports more than the standard library and Starlette (Serve's own dependency).
"""

from __future__ import annotations

import json

CALLBACK = "ray_sft.proxy:middlewares"


def error_body(message: str, kind: str, code: str | None, param: str | None = None) -> dict:
    """OpenAI's error shape, {"error": {"message", "type", "code", "param"}}: every error ray_sft answers."""
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def middlewares() -> list:
    """The proxy callback: the middlewares Serve wraps its HTTP proxy in."""
    from starlette.middleware import Middleware

    return [Middleware(JsonServeAnswers)]


# Statuses Serve's proxy answers itself, in plain text, and the error code each gets here.
SERVE_ANSWERS = {503: "overloaded", 408: "timeout"}
LOST = "the server lost this request (the replica serving it stopped); send it again"


class JsonServeAnswers:
    """ASGI middleware: every answer Serve's proxy makes itself comes in OpenAI's JSON error shape.

    An HTTP request the proxy returned from without answering (its replica died under it) gets a 503 `replica_lost`.
    Serve's plain-text 503 (backpressure) and 408 (timeout) keep their status and headers (`Retry-After` included);
    their text becomes the JSON error's message. Every other message passes through as it comes.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        answered, held, text = False, None, b""

        async def watched(message):
            nonlocal answered, held, text
            if message["type"] == "http.response.start":
                answered = True
                if message["status"] in SERVE_ANSWERS and (b"content-type", b"application/json") not in [
                        (k.lower(), v) for k, v in message.get("headers", [])]:
                    held = message  # Serve's own text: rewritten once its body is complete
                    return
            elif held is not None and message["type"] == "http.response.body":
                text += message.get("body", b"")
                if not message.get("more_body"):
                    headers = [(k, v) for k, v in held.get("headers", [])
                               if k.lower() not in (b"content-type", b"content-length")]
                    await _answer(send, held["status"], text.decode(errors="replace"),
                                  SERVE_ANSWERS[held["status"]], headers)
                return
            await send(message)

        await self.app(scope, receive, watched)
        if not answered:
            await _answer(send, 503, LOST, "replica_lost", [])


async def _answer(send, status: int, message: str, code: str, headers: list) -> None:
    body = json.dumps(error_body(message, "server_error", code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

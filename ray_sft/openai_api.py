"""The OpenAI-compatible wire format: request schemas, validation into decoding settings, response bodies.

No model and no Ray here: `serve` parses every request with these and answers with these bodies, so a bad request
becomes a 4xx with OpenAI's error shape {"error": {"message", "type", "code"}} before it reaches the model.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ray_sft import data
from ray_sft.generate import Completion, with_overrides
from ray_sft.proxy import error_body
from ray_sft.spec import GenerationSpec, ServeSpec


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = status, message, code, kind, param

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.code, self.param)


# ---------------------------------------------------------------------------------------------------------------
# Requests


class _Request(BaseModel):
    # Unknown OpenAI fields (user, logprobs, ...) are ignored rather than refused, as most servers do.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    repetition_penalty: Optional[float] = Field(None, gt=0)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class CompletionRequest(_Request):
    prompt: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens


async def read_body(request, limit: int) -> bytes:
    """The raw body, refused (413) as soon as it is known to pass `limit` bytes: before it is all read, parsed or
    tokenized, so an oversized request costs the replica next to nothing."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than serve.max_request_bytes ({limit} bytes)", "request_too_large",
                    param="body")


def parse(raw: bytes, schema: type[_Request], limits: ServeSpec) -> _Request:
    """The request, validated and within the server's bounds (limits: the spec's serve section)."""
    payload = _load_json(raw, limits.max_json_depth)
    try:
        request = schema.model_validate(payload)
    except ValidationError as exc:
        fields = [".".join(map(str, e["loc"])) or "body" for e in exc.errors()]
        problems = "; ".join(f"{name}: {e['msg']}" for name, e in zip(fields, exc.errors()))
        raise ApiError(400, f"invalid request: {problems}", "invalid_request", param=fields[0]) from None
    _check_bounds(request, limits)
    return request


def _load_json(raw: bytes, max_depth: int):
    too_deep = ApiError(400, f"request body: JSON nested more than {max_depth} levels deep (serve.max_json_depth)",
                        "json_too_deep", param="body")
    try:
        payload = json.loads(raw)
    except RecursionError:  # deeper than the parser itself goes
        raise too_deep from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", "invalid_json", param="body") from None
    if _depth(payload) > max_depth:
        raise too_deep
    return payload


def _depth(value) -> int:
    """Nesting depth of parsed JSON, without recursion (the value may be as deep as the parser allowed)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _check_bounds(request: _Request, limits: ServeSpec) -> None:
    stop = stops(request)
    if len(stop) > limits.max_stop_strings:
        raise ApiError(400, f"stop: {len(stop)} strings; this server accepts at most {limits.max_stop_strings} "
                            "(serve.max_stop_strings)", "too_many_stops", param="stop")
    longest = max(map(len, stop), default=0)
    if longest > limits.max_stop_chars:
        raise ApiError(400, f"stop: a string of {longest} characters; this server accepts at most "
                            f"{limits.max_stop_chars} (serve.max_stop_chars)", "stop_too_long", param="stop")
    messages = getattr(request, "messages", [])
    if len(messages) > limits.max_messages:
        raise ApiError(400, f"messages: {len(messages)} messages; this server accepts at most {limits.max_messages} "
                            "(serve.max_messages)", "too_many_messages", param="messages")


def settings_for(request: _Request, defaults: GenerationSpec, max_tokens_limit: int) -> GenerationSpec:
    """The request's decoding: the spec's (the recipe's) defaults, with the fields the request set.

    A temperature above 0 turns sampling on; 0 means greedy, as in OpenAI's API.
    """
    max_tokens = getattr(request, "max_completion_tokens", None) or request.max_tokens
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of {max_tokens_limit}",
                       "max_tokens_exceeded", param="max_tokens")
    sampling = None if request.temperature is None else request.temperature > 0
    return with_overrides(defaults, max_new_tokens=max_tokens, do_sample=sampling,
                          temperature=request.temperature or None, top_p=request.top_p,
                          repetition_penalty=request.repetition_penalty)


def stops(request: _Request) -> list[str]:
    return [request.stop] if isinstance(request.stop, str) else list(request.stop or [])


def render_chat(messages: list[Message], template: str) -> str:
    """Messages as one prompt in the inference template: the system message as the line the training template
    puts before the instruction, earlier turns as answered instructions, the last user message as the question.
    """
    if messages[-1].role != "user":
        raise ApiError(400, "the last message must have role 'user'", "invalid_messages")
    system = "".join("\n" + m.content for m in messages if m.role == "system")
    turns, pending = [], None
    for message in (m for m in messages if m.role != "system"):
        if message.role == "user":
            pending = data.render_prompt(template, message.content)
            turns.append(pending)
        elif pending is not None:
            turns.append(message.content)
    return system + "".join(turns)


# ---------------------------------------------------------------------------------------------------------------
# Responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def response_body(kind: str, rid: str, model: str, completion: Completion) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": completion.text},
                  "finish_reason": completion.finish_reason}
    else:
        choice = {"index": 0, "text": completion.text, "logprobs": None, "finish_reason": completion.finish_reason}
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice], "usage": usage(completion)}


def chunk_event(kind: str, rid: str, model: str, text: str, finish_reason: str | None = None,
                completion: Completion | None = None) -> str:
    """One server-sent event in OpenAI's streaming chunk format; the last one carries finish_reason and usage."""
    if kind == "chat":
        choice = {"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    body = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
    if completion is not None:
        body["usage"] = usage(completion)
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def error_event(error: ApiError) -> str:
    """A failure after the stream began (its 200 status is already sent): an error event, as OpenAI sends one."""
    return f"data: {json.dumps(error.body(), ensure_ascii=False)}\n\n"


DONE_EVENT = "data: [DONE]\n\n"


def models_body(names: list[str]) -> dict:
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "ray_sft"} for name in names]}

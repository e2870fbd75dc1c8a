"""What ray_sft.proxy's middleware adds to each ASGI message Serve's HTTP proxy sends (a streamed token is one):
the same stream of messages sent bare and through the middleware, alternating, median of the repeats.

    .venv/bin/python bench/proxy_overhead.py --messages 200000 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from ray_sft import proxy


def stream(messages: int):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for _ in range(messages):
            await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


async def _timed(app, messages: int) -> float:
    async def send(message):
        return None

    async def receive():
        return {"type": "http.disconnect"}

    started = time.perf_counter()
    await app({"type": "http"}, receive, send)
    return (time.perf_counter() - started) / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    app = stream(args.messages)
    runs = {"bare": [], "middleware": []}
    for _ in range(args.repeats):  # alternating: a b a b ...
        runs["bare"].append(asyncio.run(_timed(app, args.messages)))
        runs["middleware"].append(asyncio.run(_timed(proxy.JsonServeAnswers(app), args.messages)))
    added = [m - b for b, m in zip(runs["bare"], runs["middleware"])]
    print("| path | us per message, median (min-max) |\n|---|---|")
    for name, values in [*runs.items(), ("added by the middleware", added)]:
        print(f"| {name} | {statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f}) |")


if __name__ == "__main__":
    main()

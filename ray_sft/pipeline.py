"""`ray-sft run`: the whole pipeline in one call, read top-down.

fit: tune when the spec has a search space (the winner is <run>/best/adapter), else train (<run>/adapter);
serve: put that adapter behind the OpenAI-compatible app and ask it the spec's first sample prompt over HTTP,
exactly as a client would. By default the app is removed after the sample, so the command ends (a quickstart, a
CI run or a Ray job must finish on its own); `keep_serving` holds it up until Ctrl-C. `ray-sft serve
--detach` is the way to leave an app running on a cluster.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from ray_sft.spec import JobSpec

Serving = Literal["none", "sample", "keep"]


class PipelineError(RuntimeError):
    """A stage that ended without something to hand to the next one."""


@dataclass
class RunOutcome:
    adapter: Path
    url: str | None = None  # the served API's base URL (ends in /v1), when the adapter was served
    sample: str | None = None  # the served completion of spec.generation.sample_prompts[0]


def searches(job: JobSpec) -> bool:
    return bool(job.tune.search_space)


def check(job: JobSpec, serving: Serving) -> None:
    """Spec errors before any cluster starts: tune's rules, and a sample prompt to ask when serving."""
    from ray_sft import spec, tune

    if searches(job):
        tune.check(job)
    if serving != "none" and not job.generation.sample_prompts:
        raise spec.SpecError(["generation.sample_prompts: empty; `run` asks the served adapter the first one "
                              "(or use --no-serve)"])


def run(job: JobSpec, address: str | None = None, serving: Serving = "sample",
        say: Callable[[str], None] = print) -> RunOutcome:
    """tune|train -> serve -> one sample over HTTP, on the cluster `address` names (default: a private one)."""
    from ray_sft import cluster

    check(job, serving)
    embedded = cluster.embedded(address)
    with cluster.connect(address):
        adapter = fit(job, say)
        if serving == "none":
            return RunOutcome(adapter)
        return serve_winner(job, adapter, embedded, serving == "keep", say)


def fit(job: JobSpec, say: Callable[[str], None]) -> Path:
    """The adapter to serve: the search's best, or the plain training run's final one."""
    from ray_sft import train, tune

    if not searches(job):
        adapter = train.fit(job).adapter_dir
        say(f"adapter: {adapter}")
        return adapter
    outcome = tune.search(job)
    if not outcome.best:
        raise PipelineError(f"tune: no trial left a checkpoint ({len(outcome.failed)} failed); nothing to serve")
    say(f"best: trial {outcome.best['trial_id']} {outcome.best['metric']}={outcome.best['value']:.4g} "
        f"params {outcome.best['params']}")
    if outcome.failed:
        say(f"warning: {len(outcome.failed)} trial(s) failed: {', '.join(outcome.failed)}")
    say(f"adapter: {outcome.best['adapter']}")
    return Path(outcome.best["adapter"])


def app_route(job: JobSpec, embedded: bool) -> tuple[str, str]:
    """(Serve app name, route prefix). On a shared cluster the run gets its own app and prefix, so it never
    hot-swaps or shadows an app someone deployed there (`ray-sft serve` uses the name ray_sft at /)."""
    from ray_sft import serve

    if embedded:
        return serve.APP_NAME, "/"
    return f"run-{job.output.name}", f"/run/{job.output.name}"


def serve_winner(job: JobSpec, adapter: Path, embedded: bool, keep: bool,
                 say: Callable[[str], None]) -> RunOutcome:
    from ray_sft import generate, serve, targets

    host, port = job.serve.host, job.serve.port
    key = targets.api_key(job, host)
    app, prefix = app_route(job, embedded)
    url = serve.start(host, port, job.serve.request_timeout_s) + prefix.rstrip("/") + "/v1"
    serve.deploy(job, generate.base_of(adapter), {job.output.name: str(adapter)}, key, name=app,
                 route_prefix=prefix)
    say(f"serving {job.output.name} on {url}" + (" (Ctrl-C stops)" if keep else ""))
    try:
        prompt = job.generation.sample_prompts[0]
        text = ask(url, job.output.name, prompt, key)
        say(f"sample prompt: {prompt}\nsample completion: {text}")
    except BaseException:
        serve.stop(app)
        raise
    if keep:
        serve.run_until_interrupted(app)  # removes the app on Ctrl-C
    else:
        serve.stop(app)
        say("stopped serving (--keep-serving keeps the app up)")
    return RunOutcome(adapter, url, text)


def ask(url: str, model: str, prompt: str, key: str | None = None, timeout_s: float = 300) -> str:
    """One chat completion over HTTP (the server renders the prompt with the run's inference template)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}]}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"{url}/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as exc:
        raise PipelineError(f"{url}: the sample request failed with {exc.code}: {exc.read()[:500]!r}") from None

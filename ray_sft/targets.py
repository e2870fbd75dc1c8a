"""What `ray-sft serve` serves, and the checks that refuse a set-up before anything starts.

The settings, base and adapters come from a job spec and/or NAME=PATH pairs (`load`); adapter names are checked
against the base's (`check_adapters`) and a host beyond loopback needs an API key (`api_key`). Driver side: no Ray,
no model.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

from ray_sft import generate
from ray_sft import spec as spec_module
from ray_sft.spec import JobSpec

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ServeError(ValueError):
    """A serving set-up that must not start (bad adapter names, a public host without an API key, ...)."""


def load(spec_path: str | None, overrides: list[str], adapter_args: list[str],
         base: str | None) -> tuple[JobSpec, str, dict[str, str]]:
    """(settings, base, name -> adapter folder) from a job spec and/or NAME=PATH pairs.

    A job spec serves its run's tune winner (<run>/best/adapter) if there is one, else <run>/adapter, under
    output.name; without one, the settings come from the first adapter's run folder, except trust_remote_code
    (false unless an override sets it). `overrides` apply either way.
    """
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


def base_name(base: str) -> str:
    """The name clients use for the bare base: a Hub id as is, a local folder by its last component."""
    return Path(base).name if Path(base).exists() else base


def check_adapters(spec: JobSpec, base: str, adapters: dict[str, str]) -> None:
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

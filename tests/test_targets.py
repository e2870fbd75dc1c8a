"""`ray_sft.targets`: what `ray-sft serve` serves from its arguments, and the set-ups it refuses (nothing deployed)."""

from __future__ import annotations

import pytest

from ray_sft import cli, generate, targets
from tests.adapters import random_adapter
from tests.conftest import QUICKSTART, quick_spec

KEY_ENV = "RAY_SFT_TEST_API_KEY"


def test_public_host_requires_an_api_key(tmp_path, monkeypatch):
    spec = quick_spec(tmp_path)
    monkeypatch.setattr(spec.serve, "api_key_env", None)
    assert targets.api_key(spec, "127.0.0.1") is None and targets.api_key(spec, "::1") is None
    with pytest.raises(targets.ServeError, match="API key is required"):
        targets.api_key(spec, "0.0.0.0")
    monkeypatch.setattr(spec.serve, "api_key_env", KEY_ENV)
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(targets.ServeError, match=KEY_ENV):
        targets.api_key(spec, "192.0.2.1")
    monkeypatch.setenv(KEY_ENV, "s3cret")
    assert targets.api_key(spec, "0.0.0.0") == "s3cret"


@pytest.fixture(scope="module")
def run_adapter(tmp_path_factory, tiny_model_path):
    """<run>/adapter with <run>/spec.yaml beside it, as train leaves them (made in seconds, without Ray)."""
    out = tmp_path_factory.mktemp("run")
    return random_adapter(quick_spec(out), tiny_model_path, out, seed=3)


def _served(argv: list[str]):
    """What `ray-sft serve ARGV` would deploy: (spec, base, adapters)."""
    args = cli._parse(["serve", *argv])
    return targets.load(args.spec, args.overrides, args.adapter, args.base)


def test_overrides_between_and_after_adapter_flags_reach_the_served_spec(run_adapter):
    job, base, adapters = _served(["--adapter", f"a={run_adapter}", "serve.max_batch_size=3",
                                   "--adapter", f"b={run_adapter}", "generation.max_new_tokens=7"])
    assert (job.serve.max_batch_size, job.generation.max_new_tokens) == (3, 7)
    assert job.quantization == generate.run_spec(run_adapter).quantization  # the rest: the adapter's run spec
    assert adapters == {"a": str(run_adapter), "b": str(run_adapter)} and base == generate.base_of(run_adapter)


def test_overrides_with_a_job_spec_reach_the_served_spec(run_adapter):
    run = run_adapter.parent
    job, _, adapters = _served([str(QUICKSTART), f"output.dir={run.parent}", f"output.name={run.name}",
                                "--adapter", f"b={run_adapter}", "serve.max_batch_size=3"])
    assert job.serve.max_batch_size == 3 and adapters == {run.name: str(run_adapter), "b": str(run_adapter)}


@pytest.mark.parametrize("override,error", [
    ("serve.max_batch_size=0", "serve.max_batch_size: must be > 0"),
    ("serve.gpus_per_replica=many", "serve.gpus_per_replica: 'many' is not one of"),
    ("serve.bogus=1", "serve.bogus: unknown field"),
])
def test_bad_serve_override_exits_2_naming_the_field(run_adapter, capsys, override, error):
    assert cli.main(["serve", "--adapter", f"a={run_adapter}", override]) == 2
    assert error in capsys.readouterr().err

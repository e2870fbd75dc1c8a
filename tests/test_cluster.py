"""Every cluster config parses, and they agree: one image tag, `ray-sft` commands the CLI accepts, spec files that
exist in jobs/ and validate with their overrides, autoscaling GPU worker groups. No registry host is named."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ray_sft import cli, spec

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
MANIFESTS = sorted(CLUSTER.rglob("*.yaml"))
IMAGE = "IMAGE_REPO/ray-sft:0.1.0"
COMMAND = re.compile(r"ray-sft (\w+) (jobs/[\w./-]+\.yaml)")
REGISTRY_HOSTS = re.compile(r"docker\.io|ghcr\.io|gcr\.io|quay\.io|nvcr\.io|amazonaws\.com|azurecr\.io|"
                            r"pkg\.dev|registry\.k8s\.io|registry-1\.")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _by_kind(kind: str) -> dict:
    (doc,) = [d for p in MANIFESTS for d in _docs(p) if d.get("kind") == kind]
    return doc


def _walk(node, key: str):
    """Every value stored under `key` anywhere in a parsed document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def test_every_manifest_parses_and_all_kinds_are_there():
    assert {p.relative_to(CLUSTER).as_posix() for p in MANIFESTS} >= {
        "ray-cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/rayservice.yaml"}
    kinds = {d.get("kind") for p in MANIFESTS for d in _docs(p)}
    assert {"RayCluster", "RayJob", "RayService"} <= kinds


def test_one_image_tag_everywhere():
    images = {i for p in MANIFESTS for d in _docs(p) for i in _walk(d, "image")}
    assert images == {IMAGE}
    mentioned = {m for p in CLUSTER.rglob("*") if p.is_file()
                 for m in re.findall(r"[\w.-]+/ray-sft:[\w.]+", p.read_text())}
    assert mentioned == {IMAGE}


def test_no_registry_host_is_named_anywhere_in_the_repo():
    skip = {".venv", ".git", ".gpu", "runs", ".pytest_cache", "__pycache__"}
    files = [p for p in REPO.rglob("*") if p.is_file() and not skip & set(p.relative_to(REPO).parts)
             and p.suffix in {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ""}]
    hits = [f"{p.relative_to(REPO)}: {m}" for p in files if p != Path(__file__)
            for m in REGISTRY_HOSTS.findall(p.read_text(errors="ignore"))]
    assert hits == []


def test_commands_are_real_verbs_on_real_specs():
    texts = [p.read_text() for p in [*MANIFESTS, CLUSTER / "README.md"]]
    commands = {c for text in texts for c in COMMAND.findall(text)}
    assert ("tune", "jobs/llm-jp-3-1.8b-dolly-ja-tune.yaml") in commands
    for verb, path in commands:
        assert verb in cli.VERBS, verb
        assert (REPO / path).is_file(), path


def test_rayjob_entrypoint_parses_and_its_spec_validates():
    argv = shlex.split(_by_kind("RayJob")["spec"]["entrypoint"])
    assert argv[:2] == ["ray-sft", "tune"]
    args = cli.build_parser().parse_args(argv[1:])
    job = spec.load(REPO / args.spec, args.overrides)
    assert job.tune.search_space and job.scaling.use_gpu is True


def test_rayservice_serves_the_rayjobs_spec_and_its_builder_exists():
    config = yaml.safe_load(_by_kind("RayService")["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    job_argv = shlex.split(_by_kind("RayJob")["spec"]["entrypoint"])
    assert app["args"]["spec"] == job_argv[2]
    assert "output.dir=/mnt/runs" in app["args"]["overrides"] and "output.dir=/mnt/runs" in job_argv
    job = spec.load(REPO / app["args"]["spec"], app["args"]["overrides"])
    assert job.serve.host == "0.0.0.0" and job.serve.api_key_env  # public bind only with an API key
    assert config["http_options"]["request_timeout_s"] == job.serve.request_timeout_s  # the proxy's, not the app's
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_rayservice_builder_serves_a_run_over_http(trained_run):
    """The RayService entry point, run for real: the app it builds serves the run's adapter on 127.0.0.1."""
    import httpx
    from ray import serve

    from ray_sft import serve as ray_sft_serve
    from ray_sft.spec import ServeSpec
    from tests.conftest import QUICKSTART, free_port

    args = {"spec": str(QUICKSTART), "overrides": [f"output.dir={trained_run.run_dir.parent}", "output.name=shared",
                                                   "serve.max_prompt_tokens=64", "serve.max_tokens_limit=64"]}
    url = ray_sft_serve.start("127.0.0.1", free_port(), ServeSpec().request_timeout_s)
    try:
        serve.run(ray_sft_serve.app_builder(args), name=ray_sft_serve.APP_NAME, route_prefix="/")
        assert "shared" in [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=60).json()["data"]]
        answer = httpx.post(f"{url}/v1/completions", timeout=120,
                            json={"model": "shared", "prompt": "### 指示\nこんにちは\n### 回答:\n", "max_tokens": 4})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
    finally:
        ray_sft_serve.stop()
        serve.shutdown()


def _gpu_groups(doc: dict) -> list[dict]:
    cluster = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
    return [g for g in cluster["workerGroupSpecs"]
            if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_kuberay_gpu_groups_autoscale_with_token_auth(kind):
    doc = _by_kind(kind)
    cluster = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = _gpu_groups(doc)
    assert group["minReplicas"] < group["maxReplicas"]
    envs = [e for e in _walk(doc, "env")]
    modes = {e["value"] for env in envs for e in env if e["name"] == "RAY_AUTH_MODE"}
    assert modes == {"token"}


def test_launcher_has_an_autoscaling_gpu_worker_type_and_installs_the_project():
    (config,) = _docs(CLUSTER / "ray-cluster.yaml")
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert any(t["min_workers"] < t["max_workers"] for t in workers)
    assert config["docker"]["image"] == IMAGE
    assert any("pip install" in c and "ray_sft" in c for c in config["setup_commands"])


def test_local_cluster_starts_without_the_dashboard_when_its_packages_are_missing():
    """A slim `ray` install (no ray[default]): a real private cluster starts without the dashboard and runs tasks."""
    script = """
import sys
sys.modules["ray.dashboard.optional_deps"] = None  # what a slim `ray` install looks like
import ray
from ray_sft import cluster
with cluster.connect(num_cpus=1):
    print("webui", repr(ray._private.worker.global_worker.node.address_info.get("webui_url")))
    print("task", ray.get(ray.remote(lambda: 6 * 7).remote()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "task 42" in done.stdout and ("webui None" in done.stdout or "webui ''" in done.stdout)
    assert "dashboard packages are missing" in done.stderr


def test_ray_train_on_a_private_cluster_starts_no_preemption_watcher(trained_run):
    """cluster.EMBEDDED_RAY_ENV: the shared run trained on the session's private cluster, whose actor table (dead
    actors included) then holds its Train controller but no preemption watcher."""
    from ray._private import state

    classes = {a["ActorClassName"] for a in state.actors().values()}
    assert "TrainController" in classes and "PreemptionWatcher" not in classes, classes

"""The job spec: loading, validation errors (dotted path + reason, all at once), overrides, and `ray-sft validate`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ray_sft import spec
from ray_sft.cli import main
from ray_sft.spec import SpecError

REPO = Path(__file__).resolve().parents[1]
JOB_FILES = sorted(REPO.glob("jobs/**/*.yaml")) + sorted(REPO.glob("jobs/**/*.yml"))


def errors_of(data: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        spec.from_dict(data)
    return info.value.errors


def write_spec(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Good specs


def test_jobs_folder_has_specs():
    assert any(p.name == "quickstart.yaml" for p in JOB_FILES)


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_spec_validates(path):
    job = spec.load(path)
    stated = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("output") or {}
    assert job.output.name == stated.get("name", path.stem)
    # The resolved spec is itself a valid spec (what `validate` prints can be fed back).
    again = spec.from_dict(yaml.safe_load(spec.to_yaml(job)))
    assert spec.to_dict(again) == spec.to_dict(job)


def test_empty_spec_is_all_defaults_and_matches_the_recipe():
    job = spec.from_dict({})
    assert job.model.name_or_path == "llm-jp/llm-jp-3-1.8b"
    assert job.training.learning_rate == 2e-4
    assert job.training.per_device_batch_size == 4 and job.training.gradient_accumulation_steps == 16
    assert job.lora.r == 8 and job.lora.alpha == 16 and job.lora.dropout == 0.05
    assert job.lora.modules_to_save == ["embed_tokens"]
    assert job.quantization.quant_type == "nf4" and job.quantization.double_quant
    assert job.training.neftune_noise_alpha == 5 and job.training.max_length == 1024
    assert job.output.name == "job"


def test_serving_defaults_to_auto_and_takes_explicit_values():
    served = spec.from_dict({}).serve
    assert (served.gpus_per_replica, served.merge) == ("auto", "auto")  # decided at deploy time (serve.resolve)
    explicit = spec.from_dict({"serve": {"gpus_per_replica": 0, "merge": True}}).serve
    assert (explicit.gpus_per_replica, explicit.merge) == (0, True)
    assert spec.from_dict({"serve": {"gpus_per_replica": 0.5}}).serve.gpus_per_replica == 0.5


def test_quickstart_uses_tiny_model_and_resolves_bundled_data():
    job = spec.load(REPO / "jobs" / "quickstart.yaml")
    assert job.model.name_or_path == "tiny"
    assert Path(job.data.source).is_absolute()
    assert Path(job.data.source) == (REPO / "jobs" / "data" / "dolly-ja-mini.jsonl").resolve()


def test_yaml_11_scientific_notation_string_is_a_float(tmp_path):
    # PyYAML reads 2e-4 (no dot) as a string; a float field accepts it.
    path = write_spec(tmp_path, "training:\n  learning_rate: 2e-4\n")
    assert spec.load(path).training.learning_rate == pytest.approx(2e-4)


# ---------------------------------------------------------------------------------------------------------------
# Bad values: dotted path and reason


@pytest.mark.parametrize("lr", [-1, 0, -2.5e-4])
def test_non_positive_learning_rate(lr):
    assert errors_of({"training": {"learning_rate": lr}}) == ["training.learning_rate: must be > 0"]


@pytest.mark.parametrize("section, key, value, expected", [
    ("training", "per_device_batch_size", "four", "training.per_device_batch_size: 'four' is not a valid int"),
    ("training", "per_device_batch_size", 2.5, "training.per_device_batch_size: 2.5 is not a valid int"),
    ("training", "per_device_batch_size", True, "training.per_device_batch_size: True is not a valid int"),
    ("training", "learning_rate", "fast", "training.learning_rate: 'fast' is not a valid float"),
    ("training", "packing", "maybe", "training.packing: 'maybe' is not a valid bool"),
    ("model", "name_or_path", 3, "model.name_or_path: 3 is not a valid str"),
    ("lora", "modules_to_save", "embed_tokens", "lora.modules_to_save: must be a list"),
    ("lora", "dropout", 1.0, "lora.dropout: must be in [0, 1)"),
    ("serve", "port", 70000, "serve.port: must be a TCP port"),
    ("serve", "gpus_per_replica", -1, "serve.gpus_per_replica: must be >= 0 or auto"),
    ("serve", "gpus_per_replica", "many", "serve.gpus_per_replica: 'many' is not one of: float, 'auto'"),
    ("serve", "merge", "sometimes", "serve.merge: 'sometimes' is not one of: bool, 'auto'"),
])
def test_wrong_type_or_range(section, key, value, expected):
    assert errors_of({section: {key: value}}) == [expected]


def test_list_item_of_wrong_type_names_its_index():
    assert errors_of({"lora": {"modules_to_save": ["embed_tokens", 7]}}) == ["lora.modules_to_save[1]: 7 is not a valid str"]


def test_bad_literal():
    (error,) = errors_of({"quantization": {"quant_type": "int8"}})
    assert error.startswith("quantization.quant_type: 'int8' is not one of")
    assert "nf4" in error and "fp4" in error
    (error,) = errors_of({"data": {"on_bad_rows": "ignore"}})
    assert error.startswith("data.on_bad_rows: 'ignore' is not one of")


def test_bad_union_value():
    (error,) = errors_of({"training": {"bf16": "sometimes"}})
    assert error.startswith("training.bf16: 'sometimes' is not one of")
    (error,) = errors_of({"lora": {"target_modules": "every-linear"}})
    assert error.startswith("lora.target_modules:")


def test_null_for_non_optional_field():
    assert errors_of({"training": {"learning_rate": None}}) == ["training.learning_rate: None is not a valid float"]
    assert errors_of({"training": {"bf16": None}}) == ["training.bf16: must not be empty"]
    assert spec.from_dict({"training": {"neftune_noise_alpha": None}}).training.neftune_noise_alpha is None


def test_unknown_key_in_section():
    (error,) = errors_of({"training": {"learnig_rate": 1e-3}})
    assert error.startswith("training.learnig_rate: unknown field")
    assert "learning_rate" in error  # the known fields are listed


def test_unknown_top_level_section():
    (error,) = errors_of({"trainer": {"epochs": 1}})
    assert error.startswith("trainer: unknown field")
    assert "training" in error


def test_nested_unknown_key():
    (error,) = errors_of({"tune": {"scheduler": {"kind": "asha"}}})
    assert error.startswith("tune.scheduler.kind: unknown field")


@pytest.mark.parametrize("value", [5, "fast", ["a"]])
def test_non_mapping_section(value):
    assert errors_of({"training": value}) == ["training: must be a mapping"]


def test_non_mapping_spec():
    with pytest.raises(SpecError) as info:
        spec.from_dict(["training"])
    assert info.value.errors == ["<spec>: must be a mapping of sections"]


def test_all_errors_reported_at_once():
    errors = errors_of({
        "training": {"learning_rate": -1, "epochs": 0, "typo": 1},
        "lora": {"r": "eight", "bias": "some"},
        "data": 3,
        "extra": {},
    })
    paths = sorted(e.split(":")[0] for e in errors)
    assert paths == ["data", "extra", "lora.bias", "lora.r", "training.epochs", "training.learning_rate",
                     "training.typo"]
    assert "training.learning_rate: must be > 0" in errors
    assert "training.epochs: must be > 0" in errors
    message = str(SpecError(errors))
    assert all(e in message for e in errors)


def test_field_and_search_space_errors_reported_together():
    errors = errors_of({"training": {"learning_rate": -1}, "lora": {"typo": 1},
                        "tune": {"search_space": {"lora.rr": {"choice": [4]}}}})
    assert len(errors) == 3
    assert "training.learning_rate: must be > 0" in errors
    assert any(e.startswith("lora.typo: unknown field") for e in errors)
    assert "tune.search_space.lora.rr: not a searchable spec field" in errors


def test_cross_field_errors_are_all_reported():
    errors = errors_of({
        "training": {"eval_steps": 20, "save_steps": 30},
        "serve": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}},
    })
    assert [e.split(":")[0] for e in errors] == ["training.save_steps", "serve.autoscaling.max_replicas"]


def test_dequantize_base_needs_a_4bit_base():
    assert spec.from_dict({"training": {"dequantize_base": True}}).training.dequantize_base is True
    assert errors_of({"training": {"dequantize_base": True}, "quantization": {"load_in_4bit": False}}) == [
        "training.dequantize_base: needs quantization.load_in_4bit: true (there is nothing to dequantize)"]


def test_custom_template_must_have_placeholders():
    assert spec.from_dict({"prompt": {"template": "Q: {instruction}\nA: {response}"}}).prompt.template.startswith("Q:")
    (error,) = errors_of({"prompt": {"template": "no_such_template"}})
    assert error.startswith("prompt.template: 'no_such_template' is neither a named template")
    assert errors_of({"prompt": {"template": "Q: {instruction}"}}) == [
        "prompt.template: a custom template needs {response}"]
    (error,) = errors_of({"prompt": {"inference_template": "nope"}})
    assert error.startswith("prompt.inference_template:")


# ---------------------------------------------------------------------------------------------------------------
# Overrides


@pytest.mark.parametrize("text, key, value", [
    ("training.learning_rate=1e-3", "training.learning_rate", 1e-3),
    ("training.learning_rate=0.001", "training.learning_rate", 0.001),
    ("lora.r=16", "lora.r", 16),
    ("training.packing=true", "training.packing", True),
    ("training.packing=false", "training.packing", False),
    ("lora.modules_to_save=[embed_tokens, lm_head]", "lora.modules_to_save", ["embed_tokens", "lm_head"]),
    ("training.neftune_noise_alpha=null", "training.neftune_noise_alpha", None),
    ("training.neftune_noise_alpha=", "training.neftune_noise_alpha", None),
    ("output.name=a=b", "output.name", "a=b"),
    ("model.name_or_path= tiny ", "model.name_or_path", "tiny"),
    ("tune.search_space.lora.r={choice: [4, 8]}", "tune.search_space.lora.r", {"choice": [4, 8]}),
])
def test_parse_override(text, key, value):
    assert spec.parse_override(text) == (key, value)


@pytest.mark.parametrize("text", ["training.learning_rate", "=3", "lora.r=[1, 2"])
def test_malformed_override(text):
    with pytest.raises(SpecError):
        spec.parse_override(text)


def test_overrides_are_validated_and_create_sections(tmp_path):
    path = write_spec(tmp_path, "model:\n  name_or_path: tiny\n")
    job = spec.load(path, ["training.learning_rate=1e-3", "lora.r=16", "training.packing=true",
                           "lora.target_modules=[q_proj, v_proj]", "serve.autoscaling.max_replicas=3",
                           "tune.search_space.lora.r={choice: [4, 8]}",
                           "tune.search_space.training.learning_rate={loguniform: [1e-5, 1e-3]}"])
    assert job.training.learning_rate == 1e-3
    assert job.lora.r == 16
    assert job.training.packing is True
    assert job.lora.target_modules == ["q_proj", "v_proj"]
    assert job.serve.autoscaling.max_replicas == 3
    assert job.tune.search_space == {"lora.r": {"choice": [4, 8]},
                                     "training.learning_rate": {"loguniform": [1e-5, 1e-3]}}
    assert job.model.name_or_path == "tiny"  # untouched by the overrides


def test_override_replaces_yaml_value(tmp_path):
    path = write_spec(tmp_path, "training:\n  learning_rate: 0.5\n  epochs: 2\n")
    job = spec.load(path, ["training.learning_rate=0.25"])
    assert job.training.learning_rate == 0.25 and job.training.epochs == 2


def test_override_does_not_mutate_input():
    data = {"training": {"epochs": 1}}
    out = spec.apply_overrides(data, ["training.epochs=2", "lora.r=4"])
    assert data == {"training": {"epochs": 1}}
    assert out == {"training": {"epochs": 2}, "lora": {"r": 4}}


def test_override_to_unknown_field_is_rejected(tmp_path):
    path = write_spec(tmp_path, "{}\n")
    with pytest.raises(SpecError) as info:
        spec.load(path, ["training.learnig_rate=1e-3"])
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith("training.learnig_rate: unknown field")


def test_override_value_is_validated(tmp_path):
    path = write_spec(tmp_path, "{}\n")
    with pytest.raises(SpecError) as info:
        spec.load(path, ["training.learning_rate=-1"])
    assert info.value.errors == ["training.learning_rate: must be > 0"]


def test_override_through_a_leaf_is_rejected(tmp_path):
    path = write_spec(tmp_path, "training:\n  epochs: 1\n")
    with pytest.raises(SpecError) as info:
        spec.load(path, ["training.epochs.value=2"])
    assert "epochs is not a section" in info.value.errors[0]


# ---------------------------------------------------------------------------------------------------------------
# Output name, relative data, with_values


def test_output_name_defaults_to_spec_stem(tmp_path):
    assert spec.load(write_spec(tmp_path, "{}\n", "my-run.yaml")).output.name == "my-run"
    assert spec.load(write_spec(tmp_path, "output:\n  name: other\n", "x.yaml")).output.name == "other"
    job = spec.load(write_spec(tmp_path, "output:\n  dir: somewhere\n", "abc.yaml"))
    assert job.run_dir == Path("somewhere") / "abc"


def test_relative_data_source_resolved_against_spec_folder(tmp_path, monkeypatch):
    folder = tmp_path / "specs"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "rows.jsonl").write_text('{"instruction": "a", "response": "b"}\n', encoding="utf-8")
    path = write_spec(folder, "data:\n  source: data/rows.jsonl\n")
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    assert spec.load(path).data.source == str((folder / "data" / "rows.jsonl").resolve())
    # Hub ids (no such local path) are left alone.
    hub = spec.load(write_spec(folder, "data:\n  source: llm-jp/databricks-dolly-15k-ja\n", "hub.yaml"))
    assert hub.data.source == "llm-jp/databricks-dolly-15k-ja"


def test_with_values_round_trip(tmp_path):
    job = spec.load(REPO / "jobs" / "quickstart.yaml", [f"output.dir={tmp_path}"])
    same = spec.with_values(job, {})
    assert spec.to_dict(same) == spec.to_dict(job)
    assert same is not job
    trial = spec.with_values(job, {"lora.r": 4, "training.learning_rate": 1e-3})
    assert trial.lora.r == 4 and trial.training.learning_rate == 1e-3
    assert trial.output.name == job.output.name == "quickstart"
    assert trial.data.source == job.data.source
    assert job.lora.r == 8  # the original is untouched
    expected = spec.to_dict(job)
    expected["lora"]["r"] = 4
    expected["training"]["learning_rate"] = 1e-3
    assert spec.to_dict(trial) == expected


def test_with_overrides_applies_k_v_on_top_of_a_spec():
    job = spec.with_overrides(spec.from_dict({"lora": {"r": 4}}), ["serve.max_batch_size=3", "serve.merge=false"])
    assert (job.serve.max_batch_size, job.serve.merge, job.lora.r) == (3, False, 4)
    with pytest.raises(SpecError) as info:
        spec.with_overrides(job, ["serve.gpus_per_replica=-1"])
    assert info.value.errors == ["serve.gpus_per_replica: must be >= 0 or auto"]


def test_with_values_validates():
    with pytest.raises(SpecError) as info:
        spec.with_values(spec.from_dict({}), {"lora.r": 0})
    assert info.value.errors == ["lora.r: must be > 0"]


# ---------------------------------------------------------------------------------------------------------------
# Search space


def test_good_search_space():
    job = spec.from_dict({"tune": {"search_space": {
        "lora.r": {"choice": [4, 8, 16]},
        "lora.alpha": {"grid": [8, 16]},
        "lora.dropout": {"uniform": [0.0, 0.1]},
        "training.learning_rate": {"loguniform": [1e-5, 1e-3]},
        "training.warmup_steps": {"randint": [0, 10]},
    }}})
    assert set(job.tune.search_space) == {"lora.r", "lora.alpha", "lora.dropout", "training.learning_rate",
                                          "training.warmup_steps"}


@pytest.mark.parametrize("key, dist, expected", [
    ("lora.rank", {"choice": [4]}, "tune.search_space.lora.rank: not a searchable spec field"),
    ("lora", {"choice": [4]}, "tune.search_space.lora: not a searchable spec field"),
    ("tune.num_samples", {"choice": [1, 2]}, "tune.search_space.tune.num_samples: not a searchable spec field"),
    ("lora.r", {"normal": [4, 8]}, "tune.search_space.lora.r: must be one of {choice, grid, loguniform, randint, uniform: [...]}"),
    ("lora.r", {"choice": [4], "grid": [8]}, "tune.search_space.lora.r: must be one of {choice, grid, loguniform, randint, uniform: [...]}"),
    ("lora.r", {"choice": []}, "tune.search_space.lora.r.choice: needs values"),
    ("training.learning_rate", {"loguniform": [0, 1e-3]}, "tune.search_space.training.learning_rate.loguniform: bounds must be > 0"),
    ("training.learning_rate", {"loguniform": [-1e-4, 1e-3]}, "tune.search_space.training.learning_rate.loguniform: bounds must be > 0"),
    ("lora.dropout", {"uniform": [0.1, 0.1]}, "tune.search_space.lora.dropout.uniform: must be [low, high] with low < high"),
    ("lora.dropout", {"uniform": [0.2, 0.1]}, "tune.search_space.lora.dropout.uniform: must be [low, high] with low < high"),
    ("lora.dropout", {"uniform": [0.0]}, "tune.search_space.lora.dropout.uniform: must be [low, high] with low < high"),
    ("lora.dropout", {"uniform": ["a", "b"]}, "tune.search_space.lora.dropout.uniform: must be [low, high] with low < high"),
])
def test_bad_search_space(key, dist, expected):
    assert errors_of({"tune": {"search_space": {key: dist}}}) == [expected]


def test_search_space_errors_all_reported():
    errors = errors_of({"tune": {"search_space": {
        "lora.rank": {"choice": [4]},
        "training.learning_rate": {"loguniform": [0, 1]},
        "lora.dropout": {"uniform": [1, 0]},
    }}})
    assert len(errors) == 3


def test_search_space_in_yaml_file_with_exponent_floats(tmp_path):
    # YAML 1.1 would read 1e-5 (no dot) as a string and the loguniform range would be rejected.
    path = write_spec(tmp_path, "tune:\n  search_space:\n    training.learning_rate: {loguniform: [1e-5, 1e-3]}\n"
                                "    lora.dropout: {uniform: [0, 1e-1]}\n")
    job = spec.load(path)
    assert job.tune.search_space["training.learning_rate"] == {"loguniform": [1e-5, 1e-3]}
    assert job.tune.search_space["lora.dropout"] == {"uniform": [0, 0.1]}


def test_optuna_cannot_grid():
    assert errors_of({"tune": {"search_alg": "optuna", "search_space": {"lora.r": {"grid": [4, 8]}}}}) == [
        "tune.search_alg: optuna cannot sample grid dimensions"]


def test_search_space_override_validated(tmp_path):
    path = write_spec(tmp_path, "{}\n")
    with pytest.raises(SpecError) as info:
        spec.load(path, ["tune.search_space.lora.rr={choice: [4, 8]}"])
    assert info.value.errors == ["tune.search_space.lora.rr: not a searchable spec field"]


def test_field_paths_lists_leaves():
    paths = spec.field_paths()
    assert "training.learning_rate" in paths and "lora.r" in paths and "tune.scheduler.type" in paths
    assert "training" not in paths


# ---------------------------------------------------------------------------------------------------------------
# `ray-sft validate`

BAD_SPEC = "training:\n  learning_rate: -1\n  learnig_rate_typo: 3\n"


def test_validate_prints_resolved_yaml(capsys):
    assert main(["validate", str(REPO / "jobs" / "quickstart.yaml"), "lora.r=4"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)
    assert resolved["lora"]["r"] == 4
    assert resolved["model"]["name_or_path"] == "tiny"
    assert resolved["output"]["name"] == "quickstart"
    assert resolved["training"]["learning_rate"] == 2e-3
    assert resolved["quantization"]["quant_type"] == "nf4"  # defaults are printed too
    assert spec.to_dict(spec.from_dict(resolved)) == resolved


def test_validate_bad_spec_names_every_field(tmp_path, capsys):
    path = write_spec(tmp_path, BAD_SPEC + "unknown_section:\n  x: 1\n")
    assert main(["validate", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "training.learning_rate: must be > 0" in captured.err
    assert "training.learnig_rate_typo: unknown field" in captured.err
    assert "unknown_section: unknown field" in captured.err


def test_validate_bad_override_exits_2(capsys):
    assert main(["validate", str(REPO / "jobs" / "quickstart.yaml"), "lora.r=-3"]) == 2
    assert "lora.r: must be > 0" in capsys.readouterr().err


def test_validate_missing_spec_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["validate", str(missing)]) == 2
    assert "nope.yaml: no such spec file" in capsys.readouterr().err


def test_validate_invalid_yaml(tmp_path, capsys):
    path = write_spec(tmp_path, "training: [unclosed\n")
    assert main(["validate", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_console_script_validate(tmp_path):
    """The installed `ray-sft` entry point: exit codes and streams as a user sees them."""
    script = Path(sys.executable).parent / "ray-sft"
    if not script.exists():
        script = REPO / ".venv" / "bin" / "ray-sft"
    good = subprocess.run([str(script), "validate", str(REPO / "jobs" / "quickstart.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert yaml.safe_load(good.stdout)["output"]["name"] == "quickstart"
    bad = subprocess.run([str(script), "validate", str(write_spec(tmp_path, BAD_SPEC))],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "training.learning_rate: must be > 0" in bad.stderr
    assert "training.learnig_rate_typo: unknown field" in bad.stderr
    assert bad.stdout == ""

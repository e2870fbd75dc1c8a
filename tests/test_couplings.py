"""Every library internal ray_sft relies on still exists in the installed versions (see ray_sft/couplings.py)."""

from __future__ import annotations

import importlib

import pytest

from ray_sft import couplings

# (library, module, dotted attribute, parameters a callable must take): each private name or undocumented attribute
# ray_sft uses, and where.
PRIVATE_NAMES = [
    ("transformers", "trl", "SFTTrainer._get_train_sampler", ("train_dataset",)),  # train: one rank's shard, recorded
    ("accelerate", "accelerate.data_loader", "BatchSamplerShard.__init__", ("num_processes", "process_index")),  # train
    ("transformers", "transformers.modeling_layers", "GradientCheckpointingLayer", ()),  # execution.compile_layers
    ("transformers", "transformers.masking_utils", "flash_attention_mask", ()),  # modeling: varlen attention
    ("torch", "torch.nn.attention.varlen", "varlen_attn", ()),  # modeling: varlen attention
    ("torch", "torch._inductor.config", "emulate_precision_casts", ()),  # execution.compile_layers: eager rounding
    ("torch", "torch._dynamo.utils", "compile_times", ("repr", "aggregate")),  # execution.compile_seconds
    ("torch", "torch.nn", "Module._compiled_call_impl", ()),  # execution.checkpoint_around_compiled_call
    ("ray", "ray._raylet", "AuthenticationTokenLoader.instance", ()),  # jobs: re-read the token
    ("ray", "ray.serve._private.constants", "SERVE_HTTP_REQUEST_TIMEOUT_S_HEADER", ()),  # replica: refused
    ("ray", "ray.serve._private.constants", "SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER", ()),  # replica: refused
    # cluster.EMBEDDED_RAY_ENV, cluster/Dockerfile: the variable Serve's proxy reads for ray_sft.proxy's middleware
    ("ray", "ray.serve._private.constants", "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", ()),
    ("ray", "ray.experimental.internal_kv", "_internal_kv_get", ("namespace",)),  # registry: persisted state
    ("ray", "ray.experimental.internal_kv", "_internal_kv_put", ("namespace",)),  # registry
    ("ray", "ray.experimental.internal_kv", "_internal_kv_del", ("namespace",)),  # registry
    ("peft", "peft.tuners.lora", "LoraLayer.get_base_layer", ()),  # multi_lora: per-row LoRA from PEFT's layers
    ("peft", "peft.utils.other", "ModulesToSaveWrapper", ()),  # multi_lora: stacked embedding tables
]


@pytest.mark.parametrize("library, module, dotted, params", PRIVATE_NAMES, ids=[n[2] for n in PRIVATE_NAMES])
def test_private_name_exists_in_the_installed_version(library, module, dotted, params):
    owner = importlib.import_module(module)
    *path, name = dotted.split(".")
    for part in path:
        owner = getattr(owner, part)
    couplings.require(library, owner, name, params)  # raises LibraryDrift, naming the library, when it is gone


def test_bitsandbytes_repack_switch_is_an_attribute_of_every_linear4bit():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(8, 8)
    assert couplings.require("bitsandbytes", layer, "support_avx512bf16_for_cpu") in (True, False)


def test_ray_token_cache_can_be_reset():
    from ray import _raylet

    loader = couplings.require("ray", _raylet, "AuthenticationTokenLoader")
    assert callable(couplings.require("ray", loader.instance(), "reset_cache"))


def test_a_missing_name_fails_loudly_naming_library_version_and_name():
    class Owner:
        def method(self, a):
            return a

    with pytest.raises(couplings.LibraryDrift, match=r"transformers \d[^:]*: Owner\.gone is gone.*constraints-cpu"):
        couplings.require("transformers", Owner, "gone")
    with pytest.raises(couplings.LibraryDrift, match=r"Owner\.method no longer takes b"):
        couplings.require("transformers", Owner, "method", ("a", "b"))

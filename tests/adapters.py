"""A second, different adapter for the generate/serve tests, made in seconds without Ray.

LoRA normally starts with B = 0 (the adapter is a no-op until trained); initialising A and B randomly gives an
adapter whose output visibly differs from the base, which is what multi-adapter and hot-swap tests need.
"""

from __future__ import annotations

import json
from pathlib import Path


def random_adapter(spec, base_path: str, out: Path, seed: int) -> Path:
    """<out>/adapter: a random-init LoRA on the tiny base, saved as train exports one; <out>/spec.yaml beside it."""
    import torch
    from peft import get_peft_model

    from ray_sft import modeling, run_files

    torch.manual_seed(seed)
    model = modeling.load_model(base_path, spec, "cpu", training=False)
    config = modeling.lora_config(spec.lora, modeling.lora_targets(model, spec.lora))
    config.init_lora_weights = False
    get_peft_model(model, config).save_pretrained(out / "adapter")
    config_path = out / "adapter" / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["base_model_name_or_path"] = base_path
    config_path.write_text(json.dumps(saved))
    run_files.write_spec(out, spec)
    return out / "adapter"

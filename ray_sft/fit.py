"""Whether adapter folders load on a base, checked on the driver before any replica sees them.

PEFT loads each adapter onto the base's skeleton: the base's modules built from its config on the meta device, no
base weights read. A folder whose target modules are not in the base, or whose tensors do not fit the base's
shapes, is refused in seconds with PEFT's reason, so a hot swap to it never reaches a replica.
"""

from __future__ import annotations

import warnings

from ray_sft import generate
from ray_sft.spec import JobSpec
from ray_sft.targets import ServeError

# PEFT lists every tensor that does not fit; the first few say what is wrong.
REASON_CHARS = 600


def check(spec: JobSpec, base: str, adapters: dict[str, str]) -> None:
    """Raise ServeError naming the first adapter (name -> folder) that does not load on `base`."""
    skeleton = _skeleton(base, spec)
    for index, (name, path) in enumerate(adapters.items()):
        try:
            with warnings.catch_warnings():  # torch warns that copying into a meta tensor does nothing: the point
                warnings.simplefilter("ignore", UserWarning)
                # Under an internal name, as on a replica: a served name may hold a "." (a key separator to PEFT).
                skeleton = generate.add_adapter(skeleton, path, f"a{index}")
        except Exception as exc:  # PEFT's and torch's errors: missing targets, size mismatches, unreadable files
            reason = str(exc) if len(str(exc)) <= REASON_CHARS else str(exc)[:REASON_CHARS] + " ..."
            raise ServeError(f"adapter {name} ({path}) does not fit the base {base}: {reason}") from exc


def _skeleton(base: str, spec: JobSpec):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base, revision=spec.model.revision,
                                            trust_remote_code=spec.model.trust_remote_code)
    except (OSError, ValueError) as exc:  # not found, offline, not a model: the replicas could not load it either
        raise ServeError(f"serve: cannot read the config of the base {base}: {exc}") from exc
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=spec.model.trust_remote_code)

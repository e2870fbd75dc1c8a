"""Several LoRA adapters in one batch, each row on its own adapter (as S-LoRA/Punica/LoRAX do).

`attach` replaces PEFT's layers in a PeftModel by static-shape modules: every LoRA linear computes
base(x) + ((x A^T) * mask) B^T with the A and B of all adapters concatenated (scaling folded into B), where the
per-row mask keeps only the row's own adapter's columns; a `modules_to_save` embedding becomes one stacked table
indexed by (row's adapter, token). No Python loop over adapters and no shape that depends on the batch's mix, so the
decode step stays one CUDA graph. `detach` puts PEFT's layers back, so adapters can be loaded or deleted with PEFT
and attached again (a hot swap between two engine steps).

Route index 0 is the bare base; names[i] is index i + 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Route:
    """Which adapter each row of the next forward uses (set by the engine before each forward)."""

    rows: torch.Tensor | None = None  # [batch] long
    replaced: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)  # (parent, name, PEFT's module)


class MultiLoraLinear(nn.Module):
    def __init__(self, layer, names: list[str], route: Route, dtype):
        super().__init__()
        self.base, self.route = layer.get_base_layer(), route
        a, b, owner = [], [], []
        for index, name in enumerate(names, start=1):
            if name not in layer.lora_A:
                continue
            if layer.use_dora.get(name):
                raise ValueError(f"adapter {name}: DoRA layers cannot be batched per row")
            a.append(layer.lora_A[name].weight)
            b.append(layer.lora_B[name].weight * layer.scaling[name])
            owner += [index] * layer.lora_A[name].weight.shape[0]
        if not a:  # no served adapter targets this layer
            a, b = [torch.zeros(0, self.base.in_features)], [torch.zeros(self.base.out_features, 0)]
        device = self.base.weight.device
        self.register_buffer("a", torch.cat(a).to(device, dtype), persistent=False)
        self.register_buffer("b", torch.cat(b, 1).to(device, dtype), persistent=False)
        self.register_buffer("owner", torch.tensor(owner, device=device), persistent=False)

    def forward(self, x):
        mask = (self.owner[None, :] == self.route.rows[:, None]).to(x.dtype)[:, None, :]
        return self.base(x) + ((x @ self.a.T) * mask) @ self.b.T


class MultiEmbedding(nn.Module):
    def __init__(self, wrapper, names: list[str], route: Route):
        super().__init__()
        original = wrapper.original_module
        if not isinstance(original, nn.Embedding):
            raise ValueError(f"modules_to_save on a {type(original).__name__} cannot be batched per row")
        tables = [original.weight] + [wrapper.modules_to_save[n].weight if n in wrapper.modules_to_save
                                      else original.weight for n in names]
        self.register_buffer("table", torch.stack(tables), persistent=False)  # [adapters + 1, vocab, hidden]
        self.route = route

    def forward(self, ids):
        return self.table[self.route.rows[:, None], ids]


def attach(peft_model, names: list[str], dtype) -> tuple[nn.Module, Route]:
    """(the base model with per-row adapter modules in place of PEFT's, its route); LoRA runs in `dtype`."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    route, base = Route(), peft_model.get_base_model()
    for parent in list(base.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                new = MultiLoraLinear(child, names, route, dtype)
            elif isinstance(child, ModulesToSaveWrapper):
                new = MultiEmbedding(child, names, route)
            else:
                continue
            route.replaced.append((parent, child_name, child))
            setattr(parent, child_name, new)
    return base, route


def detach(route: Route) -> None:
    """Put PEFT's modules back where `attach` replaced them."""
    for parent, child_name, original in route.replaced:
        setattr(parent, child_name, original)
    route.replaced.clear()

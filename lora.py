"""LoRA, hand-written: a frozen policy plus trainable low-rank updates (Hu et al. 2021, arXiv 2106.09685).

LoRA keeps each pretrained weight W (out, in) frozen and learns its update as a product of two thin
matrices, W + (alpha / rank) B A with A (rank, in) and B (out, rank); B starts at zero, so training
starts from the pretrained model, and only rank * (in + out) numbers per layer get gradients and Adam state.
The RL reference policy is the starting model, which is exactly this model with the adapters switched
off: `adapters_disabled(policy)` gives the KL anchor (and a frozen defender) with no second copy held.

    add_lora(model, rank)               wrap q/k/v/o and gate/up/down projections, freeze everything else
    adapters_disabled(model)            context: every adapted layer is its base layer, bit for bit
    lora_state_dict / load_lora_state_dict   the adapter tensors only (resume)
    merged_state_dict(model)            W + scale B A under plain Hugging Face names (save_pretrained)
"""
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Llama-style names


class LoRALinear(nn.Module):
    """y = base(x) + scale * (x A^T) B^T, the base nn.Linear frozen; A and B on its device and dtype."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.enabled = True
        w = base.weight
        A = torch.empty(rank, base.in_features, device=w.device)  # initialised in float32, then cast
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear's own initialisation, as the LoRA code does
        self.lora_A = nn.Parameter(A.to(w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:  # skipped, not added as zeros: "adapters off" is the base layer exactly
            return y
        A, B = self.lora_A, self.lora_B  # may be float32 while the base computes in bf16: cast in and out
        return y + (F.linear(F.linear(x.to(A.dtype), A), B) * self.scale).to(y.dtype)


def lora_layers(model) -> dict[str, LoRALinear]:
    """The adapted layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model, rank: int, alpha: float | None = None, targets=TARGETS):
    """Freeze `model` and wrap every nn.Linear whose name ends in one of `targets` with a LoRALinear
    (in place; returns the model). alpha defaults to rank (scale 1), the paper's "alpha = the first
    rank tried": keep alpha fixed when comparing ranks, so the step size does not move with the rank."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, not {rank!r}")
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters")
    alpha = rank if alpha is None else alpha
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not found:
        raise ValueError(f"no nn.Linear named {', '.join(targets)} in {type(model).__name__}: nothing to adapt")
    model.requires_grad_(False)
    for name, linear in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(linear, rank, alpha))
    return model


@contextmanager
def adapters_disabled(model):
    """Within this block the model is its base model (the reference policy); restored on exit."""
    layers = list(lora_layers(model).values())
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.enabled = was


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter tensors by parameter name (`...q_proj.lora_A`); detached, not copied, like state_dict()."""
    return {name: p.detach() for name, p in model.named_parameters() if name.endswith((".lora_A", ".lora_B"))}


def load_lora_state_dict(model, state: dict):
    """Copy saved adapters into a model that add_lora gave the same rank and targets (cast to its dtype)."""
    own = dict(model.named_parameters())
    mine = set(lora_state_dict(model))
    if set(state) != mine:
        missing, extra = sorted(mine - set(state)), sorted(set(state) - mine)
        raise ValueError(f"adapter names differ: missing {missing[:3]}, unexpected {extra[:3]} "
                         "(same targets and add_lora before loading?)")
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise ValueError(f"{name}: saved shape {tuple(tensor.shape)}, model has {tuple(own[name].shape)} "
                             "(a different --lora-rank?)")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def merged_state_dict(model, adapters: dict | None = None, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The plain model's weights, W + scale * B A for each adapted layer, under Hugging Face names
    (`...q_proj.weight`), so `model.save_pretrained(folder, state_dict=...)` writes a folder that
    AutoModelForCausalLM loads. `adapters` (a lora_state_dict, e.g. the optimiser's float32 masters)
    replaces the model's own A and B; the sum is taken in float32 and every float tensor cast to dtype."""
    adapters = lora_state_dict(model) if adapters is None else adapters
    layers = lora_layers(model)
    rename = {f"{name}.base.{p}": f"{name}.{p}" for name in layers for p in ("weight", "bias")}
    cast = {}  # by storage, so tensors tied in the model (embeddings and lm_head) stay one tensor
    out = {}
    for key, t in model.state_dict().items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        if t.is_floating_point():
            if (t.data_ptr(), t.shape) not in cast:
                cast[t.data_ptr(), t.shape] = t.to(dtype)
            t = cast[t.data_ptr(), t.shape]
        out[rename.get(key, key)] = t
    for name, layer in layers.items():
        A, B = adapters[f"{name}.lora_A"].float(), adapters[f"{name}.lora_B"].float()
        out[f"{name}.weight"] = (layer.base.weight.float() + layer.scale * (B @ A)).to(dtype)
    return out

"""The optimiser of the RL update and the warm-up: AdamW over float32 master weights.

The released code trains with DeepSpeed in bf16: the model computes in bfloat16, the optimiser
keeps a float32 copy of each trained weight (the "master") and its Adam state, and gradients are
summed in float32. MixedPrecisionAdamW does the same for a model on one device; with
dtype=float32 it is plain AdamW. Betas and weight decay are the released ones.
"""
import torch


class MixedPrecisionAdamW:
    """AdamW with float32 master weights for a model that computes in bfloat16 (DeepSpeed's bf16
    mode, which the released code trains with). The model holds bf16 weights for its forward and
    backward, and for sampling, so there is no second copy to keep in sync. Gradients add up in
    float32, as DeepSpeed's do: after each backward a hook adds a parameter's bf16 gradient into its
    master's float32 one and frees it (summed in bf16 over many micro-batches, small gradients round
    away: bf16 keeps 8 bits), so the only full-size gradient alive is the float32 sum. Each step
    clips, steps the masters and writes them back rounded to bf16.
    Only trainable parameters (requires_grad) get a master and Adam state: with LoRA (lora.py) that
    is the adapters, a few MB; the frozen weights are just cast to the compute dtype.
    With dtype=float32 the masters are the model's own parameters: plain AdamW.
    """

    def __init__(self, model, lr, dtype=torch.float32):
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        if dtype == torch.float32:
            self.master = self.params
        else:  # the masters are taken before the cast, so they keep the weights' float32 bits
            self.master = [p.detach().float().clone().requires_grad_() for p in self.params]
            for p, m in zip(self.params, self.master):
                p.register_post_accumulate_grad_hook(lambda p, m=m: self._add_to_master(p, m))
        for p in model.parameters():  # parameters only: buffers such as the rotary frequencies stay float32
            p.data = p.data.to(dtype)
        # fused: one kernel per parameter, no full-size temporaries (foreach Adam allocates a
        # second copy of the state for sqrt(v); fused is 2x faster and 0.2 GB lighter here)
        # betas and weight decay as released (OpenRLHF's defaults for the actor): (0.9, 0.95), 0
        self.adam = torch.optim.AdamW(self.master, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)

    @staticmethod
    def _add_to_master(p, m):
        """p.grad (bf16, this backward's) into m.grad (float32, the sum so far); p.grad freed."""
        if p.grad is None:
            return
        if m.grad is None:
            m.grad = p.grad.float()
        else:
            m.grad.add_(p.grad)
        p.grad = None

    @property
    def steps(self) -> int:
        """Optimiser steps taken so far, restored with the state when a run resumes."""
        state = self.adam.state.get(self.master[0])
        return int(state["step"]) if state else 0

    def zero_grad(self):
        for p, m in zip(self.params, self.master):
            p.grad = m.grad = None

    def step(self, grad_clip) -> float:
        """Clip the gradient norm to grad_clip, take one AdamW step; returns the norm before clipping."""
        if self.master is not self.params:
            for m, p in zip(self.master, self.params):  # gradients set by hand rather than by a backward
                self._add_to_master(p, m)
        norm = torch.nn.utils.clip_grad_norm_(self.master, grad_clip).item()
        self.adam.step()
        if self.master is not self.params:
            with torch.no_grad():
                for m, p in zip(self.master, self.params):
                    p.copy_(m)
                    m.grad = None
        return norm

    def master_state_dict(self) -> dict:
        """The float32 weights of the trained parameters by name: every parameter's in full fine-tuning
        (what a checkpoint stores), the adapters' with LoRA (lora.merged_state_dict merges them)."""
        return {name: m.detach() for name, m in zip(self.names, self.master)}

    def state_dict(self):
        return self.adam.state_dict()

    def load_state_dict(self, state):
        self.adam.load_state_dict(state)

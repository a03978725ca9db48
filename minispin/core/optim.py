"""RMSprop with its update compiled: what `compile_train` uses for SPIN's optimizer.

torch has no fused RMSprop. Its foreach RMSprop (the trainer's otherwise) runs the update
as five multi-tensor passes over the fp32 master weights and their state — mul, addcmul,
sqrt, add, addcdiv — so each element's parameter, gradient and running average travel
through memory several times; on the H200 profile of the 1.1B step that was ~19 ms of a
~182 ms step. `CompiledRMSprop` runs the same sequence of foreach operations through
torch.compile, which fuses them into a few kernels that read and write each tensor once.

Design choices, and why:
* A subclass of torch.optim.RMSprop: the same param_groups, the same state (`step`,
  `square_avg`), so checkpoints, resume and the scheduler see torch's optimizer; only
  `step()` differs, and only for the plain settings SPIN uses (no momentum, not centered,
  not maximize): anything else is refused at construction.
* The compiled function sees plain tensors: FSDP2's DTensors are updated through their
  local shards (`to_local()` shares their storage), so dynamo never traces DTensor.
* lr is handed over as a 0-d tensor: it changes every step under the schedule, and a
  Python float would be a constant of the graph (a recompile per step).
* The maths is torch's, op for op (grad + wd·θ; v ← α·v + (1 − α)·g²; θ ← θ − lr·g / (√v + ε));
  only the rounding of fused kernels may differ in the last bit (a compiler may contract a
  multiply and an add), which is why it comes with compile_train and not by default.
"""
from __future__ import annotations

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _rmsprop_update(params, grads, square_avgs, neg_lr, alpha: float, eps: float, weight_decay: float):
    """torch's _multi_tensor_rmsprop for momentum 0, not centered, not maximize."""
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_mul_(square_avgs, alpha)
    torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - alpha)
    avg = torch._foreach_sqrt(square_avgs)
    torch._foreach_add_(avg, eps)
    step = torch._foreach_div(grads, avg)
    torch._foreach_mul_(step, neg_lr)      # addcdiv's value=-lr, with lr a tensor
    torch._foreach_add_(params, step)


class CompiledRMSprop(torch.optim.RMSprop):
    """torch.optim.RMSprop whose update runs through torch.compile (module docstring).
    backend: torch.compile's ("inductor"; the tests may pass "eager")."""

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, backend: str = "inductor", **kw):
        for name in ("momentum", "centered", "maximize", "capturable", "differentiable"):
            if kw.get(name):
                raise ValueError(f"CompiledRMSprop does not implement {name}")
        kw.pop("fused", None)
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, **kw)
        self._update = torch.compile(_rmsprop_update, backend=backend, dynamic=False)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:  # torch's state layout, so that checkpoints are torch's
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64 if torch.get_default_dtype()
                                                == torch.float64 else torch.float32)
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            torch._foreach_add_([self.state[p]["step"] for p in params], 1)
            ps = [_local(p) for p in params]
            neg_lr = torch.tensor(-group["lr"], dtype=ps[0].dtype, device=ps[0].device)
            self._update(ps, [_local(p.grad) for p in params],
                         [_local(self.state[p]["square_avg"]) for p in params], neg_lr,
                         group["alpha"], group["eps"], group["weight_decay"])
        return loss

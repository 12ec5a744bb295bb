"""The optimizers: AdamW for every parameter, or Muon for the blocks' weight matrices with AdamW for the rest, and
the one optimizer step that train.py and bench.py both take."""

import inspect

import torch

from errors import UserError

OPTIMIZERS = ("adamw", "muon")  # the choices of train.py's `optimizer` setting


class Optimizers:
    """Several torch optimizers over disjoint parameters, used as one: param_groups (all of them, in order),
    step, zero_grad, state_dict and load_state_dict. torch.amp.GradScaler's unscale_ and step accept it."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


def configure_optimizer(model, weight_decay, learning_rate, betas, device_type, optimizer="adamw",
                        muon_lr=0.02, muon_momentum=0.95):
    """The optimizer of a GPT's parameters.

    "adamw": AdamW (Loshchilov & Hutter 2019) with decoupled weight decay on the matmul and embedding weights
    (every parameter with 2 or more dimensions) and none on biases and norm gains.
    "muon": Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers"; PyTorch's torch.optim.Muon) for
    the 2-D weight matrices inside the blocks, at muon_lr with muon_momentum and the same weight decay: it
    orthogonalises each matrix's momentum (Newton-Schulz iterations), so every direction of the update moves
    by the same amount. AdamW, as above, for the rest: embeddings, head, norm gains, biases.
    Each group's "lr" starts at its peak learning rate; train.py scales it by the schedule.
    AdamW uses the fused kernel where this PyTorch has one for the device, else the multi-tensor (foreach) one.

    Returns torch.optim.AdamW, or for "muon" an Optimizers(Muon, AdamW).
    Raises UserError: an unknown optimizer, or "muon" for a model without 2-D weights in its blocks.
    """
    if optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer={optimizer!r} is not one of {', '.join(map(repr, OPTIMIZERS))}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if optimizer == "muon" and n.startswith("transformer.h.") and p.dim() == 2]
    if optimizer == "muon" and not hidden:
        raise UserError("optimizer='muon' needs 2-D weight matrices inside the blocks and this model has none: "
                        "use --optimizer=adamw")
    rest = [p for _, p in named if not any(p is h for h in hidden)]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu", "mps")
    kw = {"fused": True} if fused else {"foreach": True}
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **kw)
    if optimizer == "adamw":
        return adamw
    return Optimizers(torch.optim.Muon(hidden, lr=muon_lr, momentum=muon_momentum, weight_decay=weight_decay),
                      adamw)


def clip_and_step(model, opt, scaler, grad_clip, apply=lambda grad_norm: True):
    """The optimizer step after the backward pass(es): unscale the gradients (float16 loss scaling), clip their
    global norm to grad_clip (Pascanu et al. 2013; 0 turns clipping off), update the weights unless
    apply(grad_norm) says no (train.py skips a step whose loss or gradient is not finite), update the loss scale,
    and zero the gradients for the next step.

    Args:
        model: the module whose .parameters() hold the gradients; opt: from configure_optimizer;
        scaler: a torch.amp.GradScaler (disabled unless float16 on CUDA).
    Returns:
        True if the weights were updated.
    """
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    applied = apply(grad_norm)
    if applied:
        scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return applied

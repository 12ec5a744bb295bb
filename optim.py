"""The optimizers: AdamW for every parameter, or Muon for the blocks' weight matrices with AdamW for the rest."""

import inspect

import torch

from errors import UserError

OPTIMIZERS = ("adamw", "muon")  # the choices of train.py's `optimizer` setting


def check_optimizer(optimizer):
    """Raise UserError unless `optimizer` is one of OPTIMIZERS (plumbing.check_settings: before anything is written)."""
    if optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer={optimizer!r} is not one of {', '.join(map(repr, OPTIMIZERS))}")


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


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients of Jordan et al. 2024
NS_STEPS = 5
NS_DTYPE = torch.bfloat16  # the iterations tolerate bfloat16's rounding (Jordan et al.), and it halves their cost


def orthogonalize(g, steps=NS_STEPS, eps=1e-7):
    """Newton-Schulz iterations towards the orthogonal factor U V^T of each matrix G = U S V^T, as in Muon
    (Jordan et al. 2024): X <- a X + (b A + c A^2) X with A = X X^T, after dividing X by its Frobenius norm so
    that every singular value starts below 1. The coefficients (a, b, c) = NS_COEFFICIENTS push small singular
    values up fast rather than converging exactly: the result's singular values end between about 0.5 and 1.5.

    g: (k, rows, cols), k matrices of one shape, done together with batched matmuls. Returns (k, rows, cols) in
    NS_DTYPE. A tall matrix is iterated as its transpose, so A is the smaller (min x min) Gram matrix."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(NS_DTYPE)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers") for 2-D weight matrices: momentum
    (Nesterov's by default), the update orthogonalised by `orthogonalize`, its step scaled by sqrt(max(1,
    rows / cols)), and decoupled weight decay lr * weight_decay. The same update as torch.optim.Muon with its
    defaults, and the same state ("momentum_buffer" per matrix), so a checkpoint of either loads into the other;
    matrices of one shape are orthogonalised together, in batched matmuls (measured: dev/speed-log.md).

    Raises ValueError for a parameter that is not 2-D."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, nesterov=True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon updates 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            by_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for (rows, cols), params in by_shape.items():
                grads = [p.grad for p in params]
                bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - momentum)
                updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
                ortho = orthogonalize(torch.stack(updates)).to(params[0].dtype)
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
                torch._foreach_add_(params, list(ortho.unbind(0)), alpha=-lr * max(1, rows / cols) ** 0.5)


def configure_optimizer(model, weight_decay, learning_rate, betas, device_type, optimizer="adamw",
                        muon_lr=0.02, muon_momentum=0.95):
    """The optimizer of a GPT's parameters.

    "adamw": AdamW (Loshchilov & Hutter 2019) with decoupled weight decay on the matmul and embedding weights
    (every parameter with 2 or more dimensions) and none on biases and norm gains.
    "muon": Muon (above) for the 2-D weight matrices inside the blocks, at muon_lr with muon_momentum and the
    same weight decay: it orthogonalises each matrix's momentum (Newton-Schulz iterations), so every direction
    of the update moves by the same amount. AdamW, as above, for the rest: embeddings, head, norm gains, biases.
    Each group's "lr" starts at its peak learning rate; train.py scales it by the schedule.
    AdamW uses the fused kernel where this PyTorch has one for the device, else the multi-tensor (foreach) one.

    Returns torch.optim.AdamW, or for "muon" an Optimizers(Muon, AdamW).
    Raises UserError: an unknown optimizer, or "muon" for a model without 2-D weights in its blocks.
    """
    check_optimizer(optimizer)
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
    return Optimizers(Muon(hidden, lr=muon_lr, momentum=muon_momentum, weight_decay=weight_decay),
                      adamw)

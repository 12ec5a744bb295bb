"""The language model's head and loss in one, a chunk of positions at a time: the same numbers as
F.cross_entropy on the logits, without the (tokens x vocab_size) logits ever in memory at once.

With GPT-2's 50,304-row vocabulary the logits of a 32 x 256-token batch are 1.6 GB in float32, and as much again
for their gradient: more than the rest of a 15M-parameter model's training step. fast.FastGPT calls
chunked_cross_entropy in one line; tests/test_memory.py checks it against model.py's plain loss.
"""

import torch


HEAD_CHUNK_BYTES = 2 ** 28  # at most this many bytes of logits (in the matmul dtype) per chunk: 256 MiB
# The log-softmax and softmax of a chunk's logits run a block of positions at a time, each block at most this many
# logits (2 MiB of float32), so that its float32 values stay in the CPU's cache between the element-wise steps
# instead of going to memory and back at each one (measured: dev/speed-log.md).
HEAD_BLOCK_LOGITS = 2 ** 19


class ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of a linear head, computed a chunk of positions at a time (at most
    HEAD_CHUNK_BYTES of logits, see below), so that the logits of all positions (N x vocab_size
    floats, and as many for their gradient) never exist at once.

    For z = x W^T (one row of vocab_size logits per position), the loss is the mean over positions n with
    targets[n] != -1 of logsumexp(z[n]) - z[n, targets[n]], and its gradient with respect to z[n] is
    (softmax(z[n]) - onehot(targets[n])) / count: the standard softmax cross-entropy gradient. A chunk's rows
    hold the whole vocabulary, so forward can form that gradient as soon as it has the chunk's logits, and turns
    it at once into the chunk's share of dL/dx and dL/dW (as in Liger Kernel's fused linear cross-entropy,
    Hsu et al. 2024). Backward only multiplies them by the incoming gradient: no logits are recomputed, and the
    head costs the same 6 N n_embd vocab_size FLOPs as the plain path. What is kept from forward to backward is
    dL/dx (N x n_embd) and dL/dW (vocab_size x n_embd, float32), which the weight's .grad needs anyway.

    Logits and the matmuls of the gradient run in `dtype` (the autocast precision, as nn.Linear under autocast);
    log-softmax, softmax and the dL/dW sum over chunks in float32 (or float64 for float64 inputs). A chunk holds
    at most HEAD_CHUNK_BYTES of logits in `dtype`; its log-softmax and softmax run a block of at most
    HEAD_BLOCK_LOGITS logits at a time, whose float32 values stay in the CPU's cache, and the block's gradient
    overwrites its logits in place (no second chunk-sized buffer).

    apply(x, weight, targets, loss_weights, dtype, need_grad):
        x: (N, n_embd) hidden states; weight: (vocab_size, n_embd), the head (tied: the token embedding);
        targets: (N,) int64, -1 for positions that do not count; loss_weights: None (every position counts once)
        or (N,) float, each position's weight in the mean, so the loss is sum(w * nll) / sum(w) over the counted
        positions; need_grad: form the gradients (False under torch.no_grad, see chunked_cross_entropy). Returns
        the loss, a scalar in nats per token (float32; float64 for float64 inputs): NaN when every target is -1
        (or every weight 0), as F.cross_entropy gives. A target >= vocab_size raises
        RuntimeError (index out of bounds), as there.
        Backward runs once: the saved gradients are consumed (retain_graph cannot reuse them).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, loss_weights, dtype, need_grad):
        acc = torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 inputs
        w = weight.to(dtype)
        valid = targets != -1
        counts = valid.to(acc) if loss_weights is None else torch.where(valid, loss_weights.to(acc), 0.0)
        total = counts.sum()
        scale = counts / total  # d(loss)/d(nll of each position), as the plain path's (whatever the weights' sum)
        nll = torch.empty(x.size(0), dtype=acc, device=x.device)
        ctx.grads = None
        if need_grad:
            grad_x = torch.empty_like(x)
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        vocab_size = weight.size(0)
        most = max(1, HEAD_CHUNK_BYTES // (vocab_size * w.element_size()))  # positions per chunk at most
        chunk = -(-x.size(0) // -(-x.size(0) // most))  # positions per chunk, as even as can be (ceil of ceil)
        block = max(1, HEAD_BLOCK_LOGITS // vocab_size)  # positions per element-wise block
        t_all = targets.clamp(min=0)[:, None]
        minus_one = -valid[:, None].to(acc)  # the one-hot target to subtract, 0 for ignored positions
        with torch.autocast(x.device.type, enabled=False):  # the casts are explicit here
            for start in range(0, x.size(0), chunk):
                end = min(start + chunk, x.size(0))
                xc = x[start:end].to(dtype)
                z = xc @ w.t()  # (n, vocab_size) logits in dtype
                for b in range(start, end, block):
                    e = min(b + block, end)
                    zb, t = z[b - start:e - start], t_all[b:e]
                    # the block's log-probabilities in float32, straight from its logits in dtype
                    logp = torch.log_softmax(zb, dim=1, dtype=acc)
                    nll[b:e] = -logp.gather(1, t).squeeze(1)
                    if need_grad:  # softmax minus the one-hot target, written over the block's logits
                        zb.copy_(logp.exp_().scatter_add_(1, t, minus_one[b:e]))
                if not need_grad:
                    continue
                # z now holds the gradient of each position's nll; each row times its position's weight in the
                # mean (0 for ignored targets), applied to the small (n, n_embd) factors rather than to z
                row_scale = scale[start:end, None]
                grad_x[start:end] = (z @ w) * row_scale
                grad_w += z.t() @ (xc * row_scale).to(dtype)
                del z
        if need_grad:
            ctx.grads = grad_x, grad_w.to(weight.dtype)
        return (torch.where(valid, nll, 0.0) * counts).sum() / total

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("backward through ChunkedHeadLoss can run only once (its gradients are consumed)")
        grad_x, grad_w = ctx.grads
        ctx.grads = None
        return grad_x.mul_(grad_loss), grad_w.mul_(grad_loss), None, None, None, None


def chunked_cross_entropy(x, weight, targets, loss_weights=None):
    """F.cross_entropy(x @ weight.T, targets, ignore_index=-1) -- the same loss and gradients -- without ever
    holding the full logits (ChunkedHeadLoss), in the autocast precision when autocast is on for x's device.
    x: (N, n_embd); weight: (vocab_size, n_embd); targets: (N,) int64, -1 ignored; loss_weights: None or (N,)
    float, the weighted mean sum(w * nll) / sum(w) instead of the plain one. Returns a scalar in nats per token:
    float32 (float64 for float64 x)."""
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return ChunkedHeadLoss.apply(x, weight, targets, loss_weights, dtype, need_grad)

"""RMSNorm, and RMSNorm followed by rotary positions, with their backward passes written out: the modern recipe's
element-wise layers on a CPU, where PyTorch runs them as many small passes over memory (its CPU `rms_norm` and
its backward are composites of pow, mean, rsqrt and mul, and autograd saves a tensor at each step).

Each function below computes what model.py's reference path computes (F.rms_norm, then apply_rope), rounding
aside, in float32 (float64 for float64 input), and its gradients by the formulas given, in fewer passes. Neither
raises errors of its own: inputs of the wrong shape fail inside torch's operations. fast.py uses them
for training on a CPU; tests/test_fast.py checks them against the reference path and with gradcheck.
Measured: dev/speed-log.md.
"""

import torch


def compute_dtype(x):
    """float32, or float64 for float64 input (gradcheck): the precision the functions below work in."""
    return torch.promote_types(x.dtype, torch.float32)


def inverse_rms(x, eps):
    """r = 1 / sqrt(mean(x^2) + eps) over the last dim of x (..., C) -> (..., 1), in compute_dtype(x)."""
    # the norm reads x once, in any dtype and layout, summing in the compute dtype; squaring it back is (..., 1) work
    ss = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=compute_dtype(x))
    return ss.square_().div_(x.size(-1)).add_(eps).rsqrt_()


class RMSNormFunction(torch.autograd.Function):
    """y = x * r * w with r = 1 / sqrt(mean(x^2) + eps) (Zhang & Sennrich 2019), x (..., C), w (C,) -> y (..., C)
    in out_dtype. Backward, with g = dL/dy:
        dL/dx = r (g w) - x r^3 sum_c(g w x) / C,   dL/dw = sum over rows of g x r."""

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        r = inverse_rms(x, eps)
        y = torch.mul(x, r).mul_(weight.to(r.dtype))
        ctx.save_for_backward(x, r, weight)
        return y.to(out_dtype)

    @staticmethod
    @torch.autocast("cpu", enabled=False)  # under autocast, backward()'s matmul and vecdot would run in bfloat16
    def backward(ctx, g):
        x, r, weight = ctx.saved_tensors
        C, xc = x.size(-1), x.to(r.dtype)  # xc: x itself for float32 x, so every product below is in float32
        gw = torch.mul(g, weight.to(r.dtype))  # dL/d(x r)
        dot = torch.linalg.vecdot(gw, xc).unsqueeze(-1)
        grad_x = gw.mul_(r).addcmul_(xc, dot.mul_(r.pow(3)), value=-1 / C)
        grad_w = (r.reshape(1, -1) @ torch.mul(g, xc).reshape(-1, C)).reshape(C)
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None, None


def rms_norm(x, weight, eps, out_dtype=None):
    """RMSNorm of x (..., C) with gain weight (C,) -> (..., C) in out_dtype (default x's dtype): F.rms_norm's result,
    computed in float32 (float64 for float64 x), with the backward of RMSNormFunction. out_dtype=bfloat16 under
    autocast saves the cast that the next matmul would make."""
    return RMSNormFunction.apply(x, weight, eps, out_dtype or x.dtype)


def rotate_half(x):
    """(x1, x2) -> (x2, x1) on the two halves of the last dim (a copy)."""
    h = x.size(-1) // 2
    return torch.cat([x[..., h:], x[..., :h]], dim=-1)


class NormRopeFunction(torch.autograd.Function):
    """Per-head RMSNorm with gain w, then rotary positions (Su et al. 2021) in model.apply_rope's layout
    (channel i paired with i + D/2), written as one function: with y = x r w (r as in RMSNormFunction) and the
    cos/sin tables widened to D, c = (cos, cos) and s = (-sin, sin),
        out = y c + rotate_half(y) s,
    and backward, with g = dL/dout, the inverse rotation gy = g c - rotate_half(g) s, then RMSNorm's backward.
    x (B, T, n_head, D) in any float dtype (a strided view is fine), w (D,), cos and sin (T, D/2) -> out
    (B, n_head, T, D) contiguous, in compute_dtype(x): transposed for attention, which wants that layout. cos and
    sin are constants (no gradient)."""

    @staticmethod
    def forward(ctx, x, weight, cos, sin, eps):
        B, T, H, D = x.shape
        ct = compute_dtype(x)
        xs = torch.empty(B, H, T, D, dtype=ct).copy_(x.transpose(1, 2))
        r = inverse_rms(xs, eps)
        xs.mul_(r)  # x r, kept for backward
        w = weight.to(ct)
        c, s = torch.cat([cos, cos], dim=-1).to(ct), torch.cat([-sin, sin], dim=-1).to(ct)  # (T, D)
        # the gain folded into the (T, D) tables: rotate_half(xs w) = rotate_half(xs) rotate_half(w)
        out = torch.mul(xs, w * c).addcmul_(rotate_half(xs), rotate_half(w) * s)
        ctx.save_for_backward(xs, r, w, c, s)
        ctx.in_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return out

    @staticmethod
    @torch.autocast("cpu", enabled=False)  # under autocast, backward()'s matmul and vecdot would run in bfloat16
    def backward(ctx, g):
        xs, r, w, c, s = ctx.saved_tensors
        D = xs.size(-1)
        gy = torch.mul(g, c).addcmul_(rotate_half(g), s, value=-1)  # dL/dy
        z = torch.mul(gy, xs).reshape(-1, D)
        grad_w = z.sum(0)
        dot = torch.linalg.vecdot(z, w).reshape(r.shape)  # sum_d(gy w x r)
        grad_x = gy.mul_(w).mul_(r).addcmul_(xs, dot.mul_(r), value=-1 / D)
        return grad_x.transpose(1, 2).to(ctx.in_dtype), grad_w.to(ctx.w_dtype), None, None, None


def norm_rope(x, weight, cos, sin, eps):
    """rotary(RMSNorm(x) * weight) of queries or keys x (B, T, n_head, D) at positions with angles cos, sin (T, D/2)
    -> (B, n_head, T, D) in float32, float64 for float64 x (see NormRopeFunction): model.py's q_norm then
    apply_rope, transposed."""
    return NormRopeFunction.apply(x, weight, cos, sin, eps)

"""fused.py: RMSNorm and RMSNorm + rotary with hand-written backward passes. Checked with gradcheck (float64, finite
differences) and against model.py's reference path (F.rms_norm, apply_rope) in float32, and in the model: training
on a CPU goes through them and gives the loss and gradients of the reference path."""
import pytest
import torch
import torch.nn.functional as F

import fused
from model import GPT, GPTConfig, apply_rope, rope_tables


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def test_rms_norm_gradcheck():
    x = randn(2, 3, 6).requires_grad_()
    w = (1 + 0.3 * randn(6, seed=1)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: fused.rms_norm(x, w, 1e-5), (x, w))


def test_norm_rope_gradcheck_on_a_strided_view():
    qkv = randn(2, 5, 3 * 3 * 8).requires_grad_()  # B=2, T=5, 3 heads of 8: q is a strided view, as in the model
    w = (1 + 0.3 * randn(8, seed=1)).requires_grad_()
    cos, sin = (t.double() for t in rope_tables(8, 5))
    assert torch.autograd.gradcheck(lambda qkv, w: fused.norm_rope(qkv[..., :24].view(2, 5, 3, 8), w, cos, sin, 1e-5),
                                    (qkv, w))


def grads(f, *inputs):
    """f(*inputs) and the gradients of sum(f * a fixed random tensor) with respect to every input."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = f(*inputs)
    (out.float() * randn(*out.shape, dtype=torch.float32, seed=9)).sum().backward()
    return [out.detach().float()] + [t.grad for t in inputs]


def test_rms_norm_equals_the_reference_in_float32():
    x, w = randn(4, 7, 32, dtype=torch.float32), 1 + 0.3 * randn(32, dtype=torch.float32, seed=1)
    ours = grads(lambda x, w: fused.rms_norm(x, w, 1e-5), x, w)
    ref = grads(lambda x, w: F.rms_norm(x, (32,), w, 1e-5), x, w)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)  # float32's default tolerances


def test_norm_rope_equals_the_reference_in_float32():
    x, w = randn(3, 16, 4, 32, dtype=torch.float32), 1 + 0.3 * randn(32, dtype=torch.float32, seed=1)
    cos, sin = rope_tables(32, 16)
    ours = grads(lambda x, w: fused.norm_rope(x, w, cos, sin, 1e-5), x, w)
    ref = grads(lambda x, w: apply_rope(F.rms_norm(x, (32,), w, 1e-5), cos[:, None], sin[:, None]).transpose(1, 2),
                x, w)
    assert ours[0].is_contiguous() and ours[0].shape == (3, 4, 16, 32)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("which", ["rms_norm", "norm_rope"])
def test_bfloat16_input_is_computed_in_float32(which):
    """bfloat16 input (queries under autocast; rms_norm then answers in bfloat16, norm_rope in float32): everything is
    the float32 computation on the same values, the gain's gradient exactly so, and what is returned in bfloat16 is
    that float32 result rounded, whose relative rounding error is at most 2^-9 (allowed: 2^-8, for the float32
    rounding before it)."""
    cos, sin = rope_tables(16, 8)
    f = {"rms_norm": lambda x, w: fused.rms_norm(x, w, 1e-5),
         "norm_rope": lambda x, w: fused.norm_rope(x, w, cos, sin, 1e-5)}[which]
    x = randn(2, 8, 2, 16, dtype=torch.float32).bfloat16()
    w = 1 + 0.3 * randn(16, dtype=torch.float32, seed=1)
    upstream = randn(2, 2, 8, 16, dtype=torch.float32, seed=9).bfloat16()  # representable in both dtypes

    def run(x):
        x, w_ = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = f(x, w_)
        out.backward(upstream.view(out.shape).to(out.dtype))
        return out.detach(), x.grad, w_.grad

    out, grad_x, grad_w = run(x)
    ref_out, ref_x, ref_w = run(x.float())
    assert grad_x.dtype == torch.bfloat16 and out.dtype == (torch.bfloat16 if which == "rms_norm" else torch.float32)
    torch.testing.assert_close(grad_w, ref_w)
    torch.testing.assert_close(out.float(), ref_out, rtol=2 ** -8, atol=0)
    torch.testing.assert_close(grad_x.float(), ref_x, rtol=2 ** -8, atol=0)


def test_gradients_stay_float32_when_backward_runs_under_autocast():
    x, w = randn(4, 8, 2, 16, dtype=torch.float32), 1 + 0.3 * randn(16, dtype=torch.float32, seed=1)
    cos, sin = rope_tables(16, 8)
    for f in (lambda x, w: fused.rms_norm(x, w, 1e-5), lambda x, w: fused.norm_rope(x, w, cos, sin, 1e-5)):
        outside = grads(f, x, w)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # forward and backward both inside
            inside = grads(f, x, w)
        for a, b in zip(inside, outside):
            torch.testing.assert_close(a, b)


MODERN = dict(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False, pos_embedding="rope",
              norm="rmsnorm", mlp="swiglu", qk_norm=True)


def test_training_on_a_cpu_uses_them_and_matches_the_reference_path(monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODERN))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # gains away from 1, so that a wrong gain gradient shows
                p.add_(0.3 * torch.randn_like(p))
    idx = torch.randint(0, 96, (2, 3, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    for name in ("rms_norm", "norm_rope"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    # full_logits: the plain loss, since the chunked one also reads torch.is_grad_enabled, patched below
    _, loss = model(*idx, full_logits=True)  # grad enabled: the fused path
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    assert calls.count("norm_rope") == 2 * 2 and calls.count("rms_norm") == 2 * 2 + 1
    # the reference path, reached by the same model with the fused functions patched out
    model.zero_grad()
    monkeypatch.setattr(torch, "is_grad_enabled", lambda: False)  # read by model.py to choose the path
    _, ref_loss = model(*idx, full_logits=True)
    monkeypatch.undo()
    ref_loss.backward()
    assert len(calls) == 2 * 2 + 5  # no new calls
    torch.testing.assert_close(loss, ref_loss)
    for a, p in zip(ours, model.parameters()):  # float32 rounding in another order: ~1e-6 of each tensor's scale
        assert (a - p.grad).abs().max() <= 1e-5 * p.grad.abs().max()

"""fast.py against model.py: each fast piece equals the reference (values and gradients), speed_up keeps the
parameters and the state dict, and a fast model trains to the reference model's losses. fused.py's RMSNorm and
RMSNorm + rotary, with hand-written backward passes, are checked with gradcheck (float64, finite differences) and
against the reference path (F.rms_norm, apply_rope) in float32."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fast as fast_module
import fused
from fast import speed_up
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


def noisy_gains(model):
    """Move the norms' gains away from 1, so that a wrong gain gradient shows."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_training_on_a_cpu_uses_them_and_matches_the_reference_path(monkeypatch):
    torch.manual_seed(0)
    model = noisy_gains(GPT(GPTConfig(**MODERN)))
    fast = speed_up(copy.deepcopy(model))
    idx = torch.randint(0, 96, (2, 3, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    for name in ("rms_norm", "norm_rope"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    _, loss = fast(*idx)
    loss.backward()
    assert calls.count("norm_rope") == 2 * 2 and calls.count("rms_norm") == 2 * 2 + 1
    _, ref_loss = model(*idx)
    ref_loss.backward()
    assert len(calls) == 2 * 2 + 5  # the reference model calls none of them
    torch.testing.assert_close(loss, ref_loss)
    for a, p in zip(fast.parameters(), model.parameters()):  # float32 rounding in another order: ~1e-6 of the scale
        assert (a.grad - p.grad).abs().max() <= 1e-5 * p.grad.abs().max()
    with torch.no_grad():  # evaluation: the reference path (and the chunked loss, which equals it)
        fast(*idx)
    assert len(calls) == 2 * 2 + 5


def test_speed_up_keeps_the_parameters_and_the_state_dict():
    model = GPT(GPTConfig(**MODERN, dropout=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    assert speed_up(model) is model and isinstance(model, GPT)
    assert [id(p) for p in model.parameters()] == params
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"FastGPT", "FastAttention", "FastRMSNorm", "FastDropout"} <= kinds
    assert not kinds & {"GPT", "CausalSelfAttention", "RMSNorm", "Dropout"}  # every one of them was replaced
    reference = GPT(GPTConfig(**MODERN, dropout=0.1))
    reference.load_state_dict(after)  # a fast model's checkpoint loads into the reference model


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_the_fast_model_trains_to_the_reference_models_losses(recipe):
    # 30 AdamW steps in float32, no dropout, on one fixed batch stream: the fast model's losses follow the
    # reference's. They differ by float32 rounding in another order, which the steps carry forward: measured 4e-5
    # at most (GPT-2 recipe; 5e-7 modern). The bound, 1e-3, is 25x that; the head's weight gradient off by 1%
    # moves the losses by 7e-3 to 2e-2. Smaller errors in one piece are the per-piece tests' to catch (above).
    args = dict(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32)
    if recipe == "modern":
        args.update(MODERN)
    losses = {}
    for kind in ("reference", "fast"):
        torch.manual_seed(0)
        model = noisy_gains(GPT(GPTConfig(**args)))
        if kind == "fast":
            speed_up(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        losses[kind] = []
        for _ in range(30):
            x = torch.randint(0, 96, (4, 16), generator=g)
            _, loss = model(x, (7 * x + 3) % 96)  # a next token that the current one decides: learnable
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[kind].append(loss.item())
    assert losses["reference"][-1] < losses["reference"][0] - 0.1  # it learned something
    assert max(abs(a - b) for a, b in zip(losses["fast"], losses["reference"])) < 1e-3


def test_dropout_keeps_each_element_with_probability_one_minus_p_and_scales_it():
    n, p = 10 ** 6, 0.1
    torch.manual_seed(0)
    y = fast_module.dropout(torch.ones(n), p)
    kept = y != 0
    dropped = round(p * 65536) / 65536  # p as the 16-bit mask rounds it
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / (1 - dropped)))
    # the number dropped is Binomial(n, dropped): within 6 standard deviations of its mean
    sd = (n * dropped * (1 - dropped)) ** 0.5
    assert abs((~kept).sum().item() - n * dropped) < 6 * sd
    torch.manual_seed(0)
    assert torch.equal(fast_module.dropout(torch.ones(n), p), y)  # the seed decides the mask
    layer = fast_module.FastDropout(p).eval()
    assert layer(torch.ones(n)).eq(1).all()  # evaluation: no dropout
    x = torch.randn(3, 5, requires_grad=True)  # the gradient flows through the kept elements only
    out = fast_module.dropout(x, 0.5)
    out.sum().backward()
    assert torch.equal(x.grad, (out != 0).float() * 2)


def test_written_out_attention_with_dropout_is_scaled_dot_product_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, 4, generator=g) for _ in range(3))
    model = speed_up(GPT(GPTConfig(vocab_size=96, block_size=16, n_layer=1, n_head=2, n_embd=32)))
    attn = model.transformer.h[0].attn
    # a p this small drops nothing (it rounds to 0 of 65,536), so the written-out path must equal PyTorch's
    # attention to float32 rounding; a larger p must drop some weights
    attn.dropout_p = 1e-9
    for causal in (True, False):
        ours = attn.attend(q, k, v, causal)
        assert torch.allclose(ours, F.scaled_dot_product_attention(q, k, v, is_causal=causal), rtol=1e-5, atol=1e-6)
    attn.dropout_p = 0.5
    torch.manual_seed(0)
    assert not torch.allclose(attn.attend(q, k, v, True), F.scaled_dot_product_attention(q, k, v, is_causal=True),
                              atol=1e-3)


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_gradient_checkpointing_recomputes_the_blocks_and_changes_no_number(recipe):
    # float32 and bfloat16 autocast, with dropout: the recomputation restores the random state, so the masks, the
    # loss and every gradient are the same bits as without it
    args = dict(vocab_size=96, block_size=16, n_layer=3, n_head=2, n_embd=32, dropout=0.1)
    if recipe == "modern":
        args.update(MODERN)
    torch.manual_seed(0)
    reference = GPT(GPTConfig(**args))
    x, y = torch.randint(0, 96, (2, 4, 16), generator=torch.Generator().manual_seed(0))
    for precision in (torch.float32, torch.bfloat16):
        results = []
        for checkpointing in (False, True):
            model = speed_up(copy.deepcopy(reference), gradient_checkpointing=checkpointing)
            calls = []
            model.transformer.h[0].attn.register_forward_pre_hook(lambda *args: calls.append(1))
            torch.manual_seed(1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == torch.bfloat16):
                _, loss = model(x, y)
            loss.backward()
            results.append((loss, [p.grad for p in model.parameters()], len(calls)))
        (loss, grads, calls), (loss_c, grads_c, calls_c) = results
        assert (calls, calls_c) == (1, 2)  # with checkpointing, the block's forward runs again in backward
        assert torch.equal(loss, loss_c) and all(torch.equal(a, b) for a, b in zip(grads, grads_c))

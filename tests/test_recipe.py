"""The modern recipe's switches (model.GPTConfig, train.py): each one's forward pass, rotary positions with the
KV cache, parameter counts, the untied head, Muon's parameter groups, the WSD schedule, bad values, and resuming
with other switches."""
import math

import pytest
import torch

from checkpoint import model_from_checkpoint
from conftest import TINY, assert_user_error, run_script
from configurator import UserError
from checkpoint import quantize_int8
import optim
from optim import configure_optimizer
from model import GPT, GPTConfig, apply_rope, rope_tables, swiglu_hidden
from train import get_lr

MODERN = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False)
SWITCHES = [dict(pos_embedding="rope"), dict(norm="rmsnorm"), dict(mlp="swiglu"), dict(mlp="relu2"),
            dict(qk_norm=True), dict(tie_embeddings=False), MODERN]


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    return GPT(GPTConfig(**{**cfg, **kw}))


@pytest.mark.parametrize("switches", SWITCHES, ids=str)
def test_each_switch_runs_forward_backward_and_stays_causal(switches):
    model = tiny(**switches)
    idx, targets = torch.randint(0, 96, (2, 3, 12), generator=torch.Generator().manual_seed(0))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 12, 96) and abs(loss.item() - math.log(96)) < 0.2
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 96
    with torch.no_grad():
        a, _ = model(idx, idx)
        b, _ = model(changed, changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-5)
    q = quantize_int8(model.eval())  # int8 sampling works for every recipe
    assert q.generate(idx[:, :4], 3, temperature=0).shape == (3, 7)


def test_rope_has_no_position_table_and_saves_no_buffers():
    model = tiny(pos_embedding="rope")
    assert "wpe" not in model.transformer
    assert not any("rope" in k for k in model.state_dict())
    assert model.num_params() == tiny().num_params() - 16 * 32
    assert model.num_params(non_embedding=True) == model.num_params() - 96 * 32


def test_rope_scores_depend_on_distance_only():
    cos, sin = rope_tables(8, 40)
    q, k = torch.randn(1, 1, 1, 8).expand(1, 40, 1, 8), torch.randn(1, 1, 1, 8).expand(1, 40, 1, 8)
    q, k = apply_rope(q, cos[:, None], sin[:, None])[0, :, 0], apply_rope(k, cos[:, None], sin[:, None])[0, :, 0]
    assert torch.allclose(q[10] @ k[7], q[33] @ k[30], atol=1e-5)  # both 3 apart
    assert not torch.allclose(q[10] @ k[7], q[10] @ k[3], atol=1e-3)
    assert torch.allclose(q.norm(dim=-1), q[0].norm().expand(40), atol=1e-5)  # rotations keep lengths


@pytest.mark.parametrize("switches", [dict(pos_embedding="rope"), MODERN], ids=str)
def test_rope_greedy_generation_with_and_without_cache_is_identical_past_block_size(switches):
    model = tiny(**switches).double().eval()
    with torch.no_grad():  # random weights, so that positions matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    idx = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    cached = model.generate(idx, 40, temperature=0, use_cache=True)  # 45 tokens, block_size 16
    uncached = model.generate(idx, 40, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, 5:].tolist())) > 1


def test_swiglu_and_relu2_have_the_parameters_of_the_gelu_mlp():
    for n_embd in (32, 128, 384):
        gelu = 2 * n_embd * 4 * n_embd
        assert abs(3 * n_embd * swiglu_hidden(n_embd) - gelu) <= 3 * n_embd * 4  # within 4 hidden units
    assert swiglu_hidden(384) == 1024
    base = tiny(n_embd=96, n_head=2).num_params()
    assert tiny(n_embd=96, n_head=2, mlp="relu2").num_params() == base
    assert abs(tiny(n_embd=96, n_head=2, mlp="swiglu", bias=False).num_params()
               - tiny(n_embd=96, n_head=2, bias=False).num_params()) <= 2 * 3 * 96 * 4


def test_untied_head_is_its_own_zero_initialised_matrix():
    model = tiny(tie_embeddings=False)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.lm_head.weight.abs().max().item() == 0.0
    assert model.num_params() == tiny().num_params() + 96 * 32
    assert "lm_head.weight" in model.state_dict()


def test_old_checkpoints_without_the_switches_load_as_the_gpt2_model():
    """A checkpoint written before the switches existed: model_args without them, today's state dict keys."""
    old = tiny()
    keys = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
            "lm_head.weight"}
    assert keys <= set(old.state_dict())
    args = dict(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    loaded = model_from_checkpoint({"model": old.state_dict(), "model_args": args})
    idx = torch.randint(0, 96, (2, 16))
    assert torch.equal(loaded(idx, idx)[0], old(idx, idx)[0])


@pytest.mark.parametrize("kw,message", [
    (dict(pos_embedding="alibi"), "pos_embedding='alibi' is not one of 'learned', 'rope'"),
    (dict(norm="batchnorm"), "norm='batchnorm' is not one of 'layernorm', 'rmsnorm'"),
    (dict(mlp="geglu"), "mlp='geglu' is not one of 'gelu', 'swiglu', 'relu2'"),
    (dict(qk_norm="yes"), "qk_norm must be bool, got str 'yes'"),
    (dict(pos_embedding="rope", n_embd=30, n_head=2), "head size n_embd/n_head must be even; got 30/2 = 15"),
])
def test_bad_switch_values_are_user_errors(kw, message):
    with pytest.raises(UserError, match=re_escape(message)):
        GPTConfig(**kw)


def re_escape(s):
    import re
    return re.escape(s)


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = tiny(**MODERN, tie_embeddings=False)
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", "muon", muon_lr=0.02, muon_momentum=0.9)
    muon, adamw = opt.optimizers
    assert isinstance(muon, optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    hidden = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert hidden == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                      for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert muon.param_groups[0]["lr"] == 0.02 and muon.param_groups[0]["momentum"] == 0.9
    decayed, plain = adamw.param_groups
    assert {names[id(p)] for p in decayed["params"]} == {"transformer.wte.weight", "lm_head.weight"}
    assert all(p.dim() == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    idx = torch.randint(0, 96, (2, 16))  # a step, and a state that round-trips
    model(idx, idx)[1].backward()
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    opt.step()
    opt.zero_grad()
    assert not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)
    state = opt.state_dict()
    opt.load_state_dict(state)
    assert len(state["optimizers"]) == 2 and len(state["optimizers"][0]["state"]) == 8
    with pytest.raises(UserError, match="optimizer='sgd' is not one of"):
        configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", "sgd")



def muon_pair(momentum=0.8, nesterov=True):
    """Our Muon and torch.optim.Muon on copies of the same matrices (tall, wide, square; two of one shape)."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64) * 0.02)
            for s in [(48, 16), (48, 16), (16, 40), (16, 16)]]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=0.02, momentum=momentum, weight_decay=0.1, nesterov=nesterov)
    return ours, optim.Muon(ours, **kw), theirs, torch.optim.Muon(theirs, **kw)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_gives_torch_muons_update(monkeypatch, nesterov):
    # both orthogonalise in float64 here, so the two updates agree to float64 rounding: what is compared is the
    # momentum, the batching of one shape's matrices, the step's scale and the weight decay, not bfloat16's rounding
    import torch.optim._muon as torch_muon

    def float64_newton_schulz(grad, ns_coefficients, ns_steps, eps):
        return optim.orthogonalize(grad[None], ns_steps, eps)[0]
    monkeypatch.setattr(optim, "NS_DTYPE", torch.float64)
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", float64_newton_schulz)
    ours, ours_opt, theirs, theirs_opt = muon_pair(nesterov=nesterov)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g, dtype=torch.float64)
            b.grad = a.grad.clone()
        ours_opt.step()
        theirs_opt.step()
        for a, b in zip(ours, theirs):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
    # a checkpoint of either loads into the other
    theirs_opt.load_state_dict(ours_opt.state_dict())
    ours_opt.load_state_dict(theirs_opt.state_dict())
    assert torch.equal(ours_opt.state[ours[0]]["momentum_buffer"], theirs_opt.state[theirs[0]]["momentum_buffer"])


def test_orthogonalize_of_a_batch_is_each_matrix_alone_and_near_orthogonal(monkeypatch):
    monkeypatch.setattr(optim, "NS_DTYPE", torch.float64)
    g = torch.randn(3, 24, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    together = optim.orthogonalize(g)
    for i in range(3):
        assert torch.allclose(together[i], optim.orthogonalize(g[i:i + 1])[0], rtol=0, atol=1e-12)
    # the quintic iteration leaves singular values between about 0.5 and 1.5 (Jordan et al. 2024), not at 1
    s = torch.linalg.svdvals(together)
    assert s.min() > 0.5 and s.max() < 1.5
    with pytest.raises(ValueError, match="2-D matrices only"):
        optim.Muon([torch.nn.Parameter(torch.zeros(4))])

def test_muon_refuses_a_model_without_block_matrices():
    model = tiny(n_layer=1)
    for block in model.transformer.h:  # freeze every matrix: nothing left for Muon
        for p in block.parameters():
            p.requires_grad_(p.dim() < 2)
    with pytest.raises(UserError, match="needs 2-D weight matrices inside the blocks"):
        configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", "muon")


def test_wsd_schedule_warms_up_holds_then_decays_linearly():
    def lr(it):
        return get_lr(it, 1e-3, 10, 110, 1e-4, "wsd", 0.2)
    assert lr(0) == pytest.approx(1e-3 / 11) and lr(10) == pytest.approx(1e-3)
    assert lr(50) == lr(88) == 1e-3  # constant until the last 20% of 110 iterations
    assert lr(99) == pytest.approx(1e-3 - 0.5 * 9e-4)  # half way down
    assert lr(110) == pytest.approx(1e-4) and lr(500) == pytest.approx(1e-4)
    values = [lr(i) for i in range(88, 111)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert get_lr(5, 1e-3, 10, 110, 1e-4, "wsd", 1.0) == get_lr(5, 1e-3, 10, 110, 1e-4)  # warmup is shared
    assert get_lr(60, 1e-3, 10, 110, 1e-4, "wsd", 1.0) == pytest.approx(5.5e-4)  # all decay: a straight line


@pytest.mark.slow
def test_resume_refuses_other_switches_or_another_optimizer(sample_data, tmp_path):
    out = tmp_path / "o"
    fast = [*TINY, f"--data_dir={sample_data}", f"--out_dir={out}", "--eval_iters=2", "--eval_interval=2"]
    run_script("train.py", *fast, "--max_iters=2", "--optimizer=muon", "--norm=rmsnorm")
    # a changed shape and a changed switch: one refusal names both
    proc = run_script("train.py", *fast, "--max_iters=4", "--init_from=resume", "--optimizer=muon", "--n_layer=3",
                      check=False)
    assert_user_error(proc, "model shape or recipe differs", "n_layer: 2 there, 3 here",
                      "norm: rmsnorm there, layernorm here")
    proc = run_script("train.py", *fast, "--max_iters=4", "--init_from=resume", "--norm=rmsnorm", check=False)
    assert_user_error(proc, "was trained with optimizer='muon', not 'adamw'", "--optimizer=muon")
    proc = run_script("train.py", *fast, "--max_iters=4", "--init_from=resume", "--norm=rmsnorm",
                      "--optimizer=muon", "--lr_schedule=wsd")
    assert "resuming from iteration 2" in proc.stdout
    for bad, message in (("--lr_schedule=linear", "lr_schedule='linear' is not one of 'cosine', 'wsd'"),
                         ("--mlp=geglu", "mlp='geglu' is not one of"), ("--decay_frac=0", "decay_frac")):
        proc = run_script("train.py", *fast[:-2], f"--out_dir={tmp_path / 'new'}", bad, check=False)
        assert_user_error(proc, message)
    assert not (tmp_path / "new").exists()  # nothing written


def test_grad_scaler_unscales_and_skips_both_optimizers():
    """float16 loss scaling (GradScaler) sees Muon's and AdamW's parameters through Optimizers."""
    model = tiny(**MODERN)
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu", "muon")
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    model(idx, idx)[1].backward()
    plain = [p.grad.clone() for p in model.parameters()]
    opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(model(idx, idx)[1]).backward()
    scaler.unscale_(opt)
    assert all(torch.allclose(p.grad, g, rtol=1e-4, atol=1e-7) for p, g in zip(model.parameters(), plain))
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # both stepped
    opt.zero_grad()
    scaler.scale(model(idx, idx)[1]).backward()
    model.transformer.h[0].attn.c_attn.weight.grad[0, 0] = float("inf")  # an overflow in a Muon matrix
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # both skipped
    assert scaler.get_scale() == 512.0

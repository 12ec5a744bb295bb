import math

import pytest
import torch

from configurator import UserError
from configurator import resolve_device
from checkpoint import quantize_int8
from optim import configure_optimizer
from model import GPT, GPTConfig, check_sampling, sample_next
from tokenizer import load_tokenizer
from conftest import GPT2_RANKS, needs_gpt2


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    return GPT(GPTConfig(**{**cfg, **kw}))


def test_forward_shapes_and_loss_of_an_untrained_model():
    model = tiny()
    idx, targets = torch.randint(0, 96, (2, 3, 10))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 10, 96)
    assert abs(loss.item() - math.log(96)) < 0.2  # near-uniform predictions at initialisation
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 96) and loss is None
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_changing_token_t_never_changes_logits_before_t():
    model = tiny().eval()
    idx = torch.randint(0, 96, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 96
    a, _ = model(idx, idx)
    b, _ = model(changed, changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-4)


def test_head_is_tied_to_token_embedding():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())  # counted once
    assert model.num_params(non_embedding=True) == model.num_params() - 96 * 32 - 16 * 32


def test_gpt2_initialisation():
    model = tiny(n_layer=8, n_embd=64, n_head=4, vocab_size=512)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)
    proj = model.transformer.h[0].mlp.c_proj.weight
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert model.transformer.h[0].attn.c_attn.bias.abs().max().item() == 0.0


def test_shape_errors_are_user_errors():
    with pytest.raises(UserError, match="n_embd=30 is not divisible by n_head=4"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(UserError, match="n_head must be a positive integer"):
        GPTConfig(n_head=0)


@pytest.mark.parametrize("prompt_len,new", [(3, 10), (5, 40)])  # 40 new tokens run past block_size=16
def test_greedy_generation_with_and_without_cache_is_identical(prompt_len, new):
    model = tiny().double().eval()  # float64: no near-tie can flip an argmax between the two paths
    idx = torch.randint(0, 96, (2, prompt_len))
    cached = model.generate(idx, new, temperature=0, use_cache=True)
    uncached = model.generate(idx, new, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + new)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :prompt_len], idx)


def test_generation_stops_at_eos_and_pads_finished_rows():
    model = tiny().eval()
    idx = torch.randint(0, 96, (4, 3))
    greedy_first = model.generate(idx, 1, temperature=0)[:, -1]
    eos = int(greedy_first[0])
    out = model.generate(idx, 30, temperature=0, eos_token=eos)
    first_row = out[0, 3:]
    assert first_row[0] == eos and (first_row == eos).all()  # finished rows repeat eos


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {0, 1}
    # probabilities are ~[.64, .24, .09, .03, .01]: top_p=0.8 keeps the first two (0.64 < 0.8 <= 0.88)
    assert set(sample_next(logits, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample_next(logits, vocab_limit=3, generator=g).tolist()) <= {0, 1, 2}
    assert (sample_next(logits, temperature=0) == 0).all()
    assert len(set(sample_next(logits, generator=g).tolist())) == 5
    ties = torch.zeros(500, 6)
    assert len(set(sample_next(ties, top_k=1, generator=g).tolist())) == 1  # top_k=1 among ties: one token
    with pytest.raises(ValueError, match="top_p"):  # checked once per call by check_sampling, not per token
        check_sampling(top_p=0.0)


def test_optimizer_decays_matrices_and_embeddings_only():
    model = tiny()
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert any(p is model.transformer.wte.weight for p in decayed["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()


# every device x dtype combination, since no Mac and no GPU runs these tests
@pytest.mark.parametrize("device,dtype,have,expected", [
    ("auto", "auto", dict(cuda=True, mps=False, cuda_bf16=True), ("cuda", "bfloat16")),
    ("auto", "auto", dict(cuda=True, mps=True, cuda_bf16=False), ("cuda", "float16")),
    ("auto", "auto", dict(cuda=False, mps=True), ("mps", "float16")),
    ("auto", "auto", dict(cuda=False, mps=False), ("cpu", "bfloat16")),
    ("auto", "float32", dict(cuda=False, mps=True), ("mps", "float32")),
    ("cuda", "auto", dict(cuda=True, mps=False, cuda_bf16=True), ("cuda", "bfloat16")),
    ("cuda", "bfloat16", dict(cuda=True, mps=False, cuda_bf16=True), ("cuda", "bfloat16")),
    ("cuda", "float16", dict(cuda=True, mps=False, cuda_bf16=False), ("cuda", "float16")),
    ("cuda:1", "float32", dict(cuda=True, mps=False, cuda_bf16=True), ("cuda:1", "float32")),
    ("mps", "auto", dict(cuda=False, mps=True), ("mps", "float16")),
    ("mps", "bfloat16", dict(cuda=False, mps=True), ("mps", "bfloat16")),
    ("mps", "float16", dict(cuda=False, mps=True), ("mps", "float16")),
    ("mps", "float32", dict(cuda=False, mps=True), ("mps", "float32")),
    ("cpu", "auto", dict(cuda=True, mps=True, cuda_bf16=True), ("cpu", "bfloat16")),
    ("cpu", "bfloat16", dict(cuda=False, mps=False), ("cpu", "bfloat16")),
    ("cpu", "float16", dict(cuda=True, mps=True, cuda_bf16=True), ("cpu", "float16")),
    ("cpu", "float32", dict(cuda=False, mps=False), ("cpu", "float32")),
])
def test_device_and_dtype_resolution(device, dtype, have, expected):
    dev, device_type, precision = resolve_device(device, dtype, **have)
    assert (dev, precision) == expected and device_type == dev.split(":")[0]


@pytest.mark.parametrize("device,dtype,have,message", [
    ("cuda", "auto", dict(cuda=False, mps=False), "device 'cuda' is not available on this machine; available: cpu"),
    ("mps", "auto", dict(cuda=True, mps=False, cuda_bf16=True), "MPS needs a Mac"),
    ("tpu", "auto", dict(cuda=False, mps=False), "unknown device 'tpu'"),
    ("cpu:abc", "auto", dict(cuda=False, mps=False), "unknown device 'cpu:abc'"),
    ("cpu", "fp8", dict(cuda=False, mps=False), "unknown dtype 'fp8'"),
    ("cuda", "bfloat16", dict(cuda=True, mps=False, cuda_bf16=False), "does not support bfloat16"),
])
def test_device_and_dtype_errors(device, dtype, have, message):
    with pytest.raises(UserError, match=message):
        resolve_device(device, dtype, **have)


@needs_gpt2
def test_local_gpt2_ranks_round_trip():
    tok = load_tokenizer(str(GPT2_RANKS))
    assert tok.vocab_size == 50257 and tok.eot_token == 50256
    text = "Once upon a time, Lily saw a café 🙂.\n\n\tThe end. <|endoftext|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.eot_token not in ids
    assert tok.encode("Once upon a time") == [7454, 2402, 257, 640]  # GPT-2's ids
    with pytest.raises(UserError, match="not found"):
        load_tokenizer("no/such/file.tiktoken")


def test_int8_quantization_replaces_every_linear_and_stays_close():
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    model = tiny().eval()
    q = quantize_int8(model)
    assert all(not isinstance(m, torch.nn.Linear) or isinstance(m, DynamicLinear) for m in q.modules())
    assert sum(isinstance(m, DynamicLinear) for m in q.modules()) == 2 * 4 + 1  # 4 per block and the head
    assert isinstance(model.lm_head, torch.nn.Linear)  # the original is untouched
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, loss = model(idx, idx)
        q_logits, q_loss = q(idx, idx)  # the quantized model gives logits and loss alike
    assert (q_logits - logits).abs().max() < 0.05 * logits.abs().max()
    assert abs(q_loss.item() - loss.item()) < 0.01 * loss.item()
    out = q.generate(idx[:, :4], 5, temperature=0)
    assert out.shape == (2, 9)


def test_int8_resolves_to_cpu_float32_and_refuses_other_devices():
    assert resolve_device("auto", "auto", cuda=True, mps=False, cuda_bf16=True, quantize="int8") == \
        ("cpu", "cpu", "float32")
    with pytest.raises(UserError, match="runs on the CPU"):
        resolve_device("cuda", "auto", cuda=True, mps=False, cuda_bf16=True, quantize="int8")
    with pytest.raises(UserError, match="runs on the CPU"):
        resolve_device("cpu", "bfloat16", cuda=False, mps=False, quantize="int8")
    with pytest.raises(UserError, match="only quantization is int8"):
        resolve_device("cpu", "auto", cuda=False, mps=False, quantize="int4")


def test_generation_keeps_the_first_tokens_in_every_window():
    # an instruction header stays in view after the window slides (keep), as training windows hold it
    model = tiny().double().eval()
    idx = torch.randint(0, 96, (2, 5))
    windows = []
    hook = model.register_forward_pre_hook(lambda module, args: windows.append(args[0].clone()))
    out = model.generate(idx, 40, temperature=0, use_cache=False, keep=3)
    hook.remove()
    assert len(windows) == 40 and all(w.size(1) <= 16 for w in windows)
    assert all(torch.equal(w[:, :3], idx[:, :3]) for w in windows)
    for w, n in zip(windows, range(5, 45)):  # the window before token n: the kept 3, then the latest tokens
        assert torch.equal(w[:, 3:], out[:, n - (w.size(1) - 3):n]) or torch.equal(w, out[:, :n])
    assert any(w.size(1) < 16 and not torch.equal(w, out[:, :w.size(1)]) for w in windows)  # it did slide
    assert torch.equal(out, model.generate(idx, 40, temperature=0, use_cache=True, keep=3))

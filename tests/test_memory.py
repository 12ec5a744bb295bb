"""The chunked head + cross-entropy (chunked_loss.ChunkedHeadLoss, fast.FastGPT's loss) against model.py's plain
path: the same loss and gradients."""
import copy

import pytest
import torch
from torch.nn import functional as F

import chunked_loss
from configurator import autocast
from fast import FastGPT
from model import GPT, GPTConfig

V = 96


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    return GPT(GPTConfig(**{**cfg, **kw}))


def fast_twin(net):
    """A copy of `net` whose loss comes from chunked_loss (fast.FastGPT, the one fast class that speed_up gives the
    model itself), the same weights; its blocks stay model.py's, so that only the head differs."""
    twin = copy.deepcopy(net)
    twin.__class__ = FastGPT
    return twin


@pytest.fixture
def chunks_of_5(monkeypatch):
    """5 positions per chunk (float64 logits; 10 in bfloat16): 48 positions make 10 chunks, the last one short;
    2 positions per element-wise block, so a chunk ends in a short block."""
    monkeypatch.setattr(chunked_loss, "HEAD_CHUNK_BYTES", 5 * V * 8)
    monkeypatch.setattr(chunked_loss, "HEAD_BLOCK_LOGITS", 2 * V)


def batch():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (3, 16), generator=g)
    targets = torch.randint(0, V, (3, 16), generator=g)
    targets[0, 2:4] = -1   # ignored positions inside a chunk
    targets[1, 4:13] = -1  # positions 20-28: chunk 20-24 has no target at all
    return idx, targets


def grads_of(net, loss_fn):
    """Loss, gradient of every parameter, and gradient of the hidden states fed to the head."""
    net.zero_grad(set_to_none=True)
    hidden = {}

    def keep(module, inputs, out):
        out.retain_grad()
        hidden["x"] = out
    handle = net.transformer.ln_f.register_forward_hook(keep)
    loss = loss_fn()
    handle.remove()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in net.named_parameters()}, hidden["x"].grad.clone()


def test_chunked_loss_and_gradients_equal_float64_cross_entropy(chunks_of_5):
    net = tiny().double()
    idx, targets = batch()

    def reference():  # the plain path's float64 logits of every position, cross-entropy in float64
        logits, _ = net(idx, targets)
        return F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)

    fast = fast_twin(net)
    loss, grads, grad_x = grads_of(fast, lambda: fast(idx, targets)[1])
    ref_loss, ref_grads, ref_grad_x = grads_of(net, reference)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert torch.allclose(grad_x, ref_grad_x, rtol=1e-10, atol=1e-15)
    assert grad_x[1, 4:13].abs().max() == 0  # ignored targets: no gradient from the head
    assert grads.keys() == ref_grads.keys() and "transformer.wte.weight" in grads  # tied: one weight
    for k in grads:
        assert torch.allclose(grads[k], ref_grads[k], rtol=1e-10, atol=1e-15), k
    # model.py's plain path (loss in float32): equal within float32 rounding
    plain_loss, plain_grads, _ = grads_of(net, lambda: net(idx, targets)[1])
    assert abs(loss.item() - plain_loss.item()) < 1e-6
    for k in grads:
        assert torch.allclose(grads[k], plain_grads[k], rtol=1e-5, atol=1e-9), k


def test_head_gradient_reaches_the_tied_embedding(chunks_of_5):
    net = fast_twin(tiny().double())
    idx, targets = batch()
    _, grads, _ = grads_of(net, lambda: net(idx, targets)[1])
    unused = sorted(set(range(V)) - set(idx.flatten().tolist()))  # rows no input token looks up
    assert unused and grads["transformer.wte.weight"][unused].abs().min(dim=1).values.gt(0).all()


def test_chunked_loss_under_autocast_matches_the_plain_path(chunks_of_5):
    net = tiny()
    fast = fast_twin(net)
    idx, targets = batch()
    with autocast("cpu", "bfloat16"):
        loss, grads, _ = grads_of(fast, lambda: fast(idx, targets)[1])
        plain_loss, plain_grads, _ = grads_of(net, lambda: net(idx, targets)[1])
    assert loss.dtype == torch.float32
    assert abs(loss.item() - plain_loss.item()) < 1e-5  # same bfloat16 logits, float32 softmax
    for k in grads:  # bfloat16 matmuls summed in another order: bfloat16 rounding
        scale = plain_grads[k].abs().max()
        assert (grads[k] - plain_grads[k]).abs().max() <= 0.02 * scale, k


def test_no_grad_gives_the_same_loss_without_gradients(chunks_of_5):
    net = tiny().eval()
    idx, targets = batch()
    with torch.no_grad():
        logits, loss = fast_twin(net)(idx, targets)
        _, plain_loss = net(idx, targets)
    assert logits is None and not loss.requires_grad
    assert abs(loss.item() - plain_loss.item()) < 1e-6


def test_all_targets_ignored_gives_nan_like_cross_entropy():
    net = tiny()
    idx, _ = batch()
    targets = torch.full_like(idx, -1)
    assert torch.isnan(fast_twin(net)(idx, targets)[1]) and torch.isnan(net(idx, targets)[1])


def test_backward_runs_once(chunks_of_5):
    net = fast_twin(tiny())
    idx, targets = batch()
    loss = net(idx, targets)[1]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_weighted_loss_is_the_weighted_mean_in_both_paths(chunks_of_5):
    # loss = sum(w * nll) / sum(w) over the targets that count, and both paths give the same gradients
    net = tiny().double()
    idx, targets = batch()
    weights = torch.ones(idx.shape, dtype=torch.float64)
    weights[2, ::3] = 3.0
    weights[0, 2] = 5.0  # on an ignored target: still not counted
    nll = F.cross_entropy(net(idx, targets)[0].view(-1, V), targets.view(-1), ignore_index=-1, reduction="none")
    counted = (targets.view(-1) != -1).double() * weights.view(-1)
    expected = (nll * counted).sum() / counted.sum()
    fast = fast_twin(net)
    loss, grads, grad_x = grads_of(fast, lambda: fast(idx, targets, loss_weights=weights)[1])
    plain, plain_grads, plain_grad_x = grads_of(net, lambda: net(idx, targets, loss_weights=weights)[1])
    assert abs(loss.item() - expected.item()) < 1e-12
    # the plain path takes its loss in float32 (as the unweighted test above): equal within float32 rounding
    assert abs(plain.item() - expected.item()) < 1e-6
    assert torch.allclose(grad_x, plain_grad_x, rtol=1e-5, atol=1e-9)
    for k in grads:
        assert torch.allclose(grads[k], plain_grads[k], rtol=1e-5, atol=1e-9), k
    # weights of 1 are the plain mean
    ones = torch.ones(idx.shape, dtype=torch.float64)
    assert abs(fast(idx, targets, loss_weights=ones)[1].item() - fast(idx, targets)[1].item()) < 1e-12


@pytest.mark.parametrize("weight", [-1.0, 0.0])
def test_weights_that_sum_to_zero_or_less_give_the_plain_paths_loss_and_gradients(chunks_of_5, weight):
    # the Python API does not refuse them (train.py's data never makes them): both paths compute the same formula
    net = tiny().double()
    idx, targets = batch()
    weights = torch.full(idx.shape, weight, dtype=torch.float64)
    fast = fast_twin(net)
    loss, grads, _ = grads_of(fast, lambda: fast(idx, targets, loss_weights=weights)[1])
    plain, plain_grads, _ = grads_of(net, lambda: net(idx, targets, loss_weights=weights)[1])
    if weight:  # sum(-nll) / -n: the plain mean, and its gradients
        assert torch.allclose(loss, plain.double(), rtol=1e-6)
        for k in grads:
            assert torch.allclose(grads[k], plain_grads[k], rtol=1e-5, atol=1e-9), k
    else:  # 0 / 0 in both paths
        assert torch.isnan(loss) and torch.isnan(plain)
        for k in grads:  # NaN gradients, where the plain path has them
            assert torch.equal(grads[k].isnan(), plain_grads[k].isnan()) and grads[k].isnan().any(), k

import numpy as np
import pytest
import torch

from train import get_batch, get_lr


def test_lr_schedule_warmup_cosine_floor():
    lr = lambda it: get_lr(it, learning_rate=1e-3, warmup_iters=10, lr_decay_iters=110, min_lr=1e-4)
    assert lr(0) == pytest.approx(1e-3 / 11)
    assert lr(9) == pytest.approx(1e-3 * 10 / 11)
    assert lr(10) == pytest.approx(1e-3)            # peak at the end of warmup
    assert lr(60) == pytest.approx(5.5e-4)          # half way: the mean of peak and floor
    assert lr(110) == pytest.approx(1e-4) and lr(5000) == pytest.approx(1e-4)
    values = [lr(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # decays monotonically


def test_get_batch_targets_are_inputs_shifted_by_one(tmp_path):
    path = tmp_path / "train.bin"
    tokens = np.arange(1000, dtype=np.uint16)
    tokens.tofile(path)
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(str(path), np.uint16, 4, 8, "cpu", g)
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 7, dtype=torch.int64))  # contiguous windows
    x2, _ = get_batch(str(path), np.uint16, 4, 8, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)  # the generator alone decides the windows

import numpy as np
import pytest
import torch

from train import get_batch, get_lr
from conftest import TINY, read_log, run_script


def test_lr_schedule_warmup_cosine_floor():
    def lr(it):
        return get_lr(it, learning_rate=1e-3, warmup_iters=10, lr_decay_iters=110, min_lr=1e-4)
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


@pytest.mark.slow  # train.py as a subprocess
def test_max_iters_alone_ends_the_decay_with_the_run(sample_data, tmp_path):
    # the config as a user runs it, shrunk only in the model and the evaluation so that 100 iterations are quick
    small = ["--n_layer=1", "--n_head=1", "--n_embd=16", "--block_size=16", "--batch_size=4", "--eval_iters=1",
             "--eval_interval=50", "--device=cpu", "--dtype=float32"]
    proc = run_script("train.py", "config/tinystories_cpu.py", *small, f"--data_dir={sample_data}",
                      f"--out_dir={tmp_path}/o", "--max_iters=100")
    assert "learning rate: up to 0.002 over 50 iterations, then cosine down to 0.0002 at iteration 100" in proc.stdout
    lr = {it: float(row["lr"]) for it, row in read_log(tmp_path / "o").items()}
    assert lr[100] == 2e-4 and 2e-4 < lr[50] <= 2e-3  # min_lr at the end of this run, not at the config's 500
    # a warmup longer than the run is cut to a tenth of it
    proc = run_script("train.py", "config/tinystories_cpu.py", *small, f"--data_dir={sample_data}",
                      f"--out_dir={tmp_path}/p", "--max_iters=40")
    assert "warming up over the first 4 instead" in proc.stdout
    lr = {it: float(row["lr"]) for it, row in read_log(tmp_path / "p").items()}
    assert lr[40] == 2e-4


@pytest.mark.slow  # train.py as a subprocess
def test_gradient_checkpointing_trains_to_the_same_losses(sample_data, tmp_path):
    # the modern recipe with dropout (the recomputation must draw the same masks) and the fast CPU path, in bfloat16
    args = [*TINY, f"--data_dir={sample_data}", "--max_iters=4", "--eval_interval=2", "--dtype=bfloat16",
            "--dropout=0.1", "--pos_embedding=rope", "--norm=rmsnorm", "--mlp=swiglu", "--qk_norm=True",
            "--optimizer=muon"]
    run_script("train.py", *args, f"--out_dir={tmp_path}/plain")
    run_script("train.py", *args, f"--out_dir={tmp_path}/checkpointed", "--gradient_checkpointing=True")
    plain, checkpointed = read_log(tmp_path / "plain"), read_log(tmp_path / "checkpointed")
    assert plain.keys() == checkpointed.keys() == {0, 2, 4}
    assert all(plain[i]["train_loss"] == checkpointed[i]["train_loss"] and
               plain[i]["val_loss"] == checkpointed[i]["val_loss"] for i in plain)

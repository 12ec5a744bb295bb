"""torchrun DDP on CPU (gloo): two processes sharing the global batch train exactly like one process."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, assert_user_error, run_script

pytestmark = pytest.mark.slow  # every test here starts scripts as subprocesses

# float32, no dropout; every iteration is evaluated so the losses are compared at every step.
# Two micro-steps, so that the two-process run is bitwise the one-process run and no tolerance is needed:
# - one process adds the gradients of loss/2 of micro-batches 0 and 1 (g0/2 + g1/2); each of two processes takes one
#   micro-batch (loss/1) and DDP averages them over gloo, (g0 + g1)/2. Halving is exact in floating point (a power of
#   two, away from underflow) and a sum of two terms does not depend on their order, so both give the same bits.
#   (With more micro-steps per process the sums would be grouped differently, and their last bits could differ.)
# - both sides run one thread (OMP_NUM_THREADS=1), so each matrix product adds its terms in the same order.
# - evaluation adds float32 losses in float64, which is exact, so the order of the processes' shares does not matter.
# Then everything downstream (clipping, AdamW, Muon's bfloat16 Newton-Schulz) gets the same input and gives the same
# output, and the checkpoints must be equal. The schedule is pinned (lr_decay_iters), because the DDP run stops with
# --max_iters=2 and resumes to 4, and a schedule that follows max_iters would differ between its two halves.
ARGS = [*TINY, "--gradient_accumulation_steps=2", "--eval_interval=1", "--eval_iters=4", "--log_interval=1",
        "--lr_decay_iters=100"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def torchrun(nproc, *args):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", str(ROOT / "train.py"), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def read_log(out_dir):
    with open(out_dir / "log.csv") as f:
        return [(int(r["iter"]), float(r["train_loss"]), float(r["val_loss"])) for r in csv.DictReader(f)]


# One recipe, the modern one: DDP's code in train.py (the process group, the all-reduces of the evaluation and of
# the step's status, rank 0 alone writing) does not depend on the recipe, and this one takes both optimizers (Muon
# for the blocks' matrices, AdamW for the rest) and the model switches through it.
MODERN = ["--optimizer=muon", "--pos_embedding=rope", "--norm=rmsnorm", "--mlp=swiglu", "--qk_norm=True",
          "--lr_schedule=wsd"]


def test_two_processes_match_one_and_resume(sample_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*ARGS, *MODERN, f"--data_dir={sample_data}"]
    run_script("train.py", *args, f"--out_dir={one}", "--max_iters=4", env=ONE_THREAD)
    # the DDP run stops at 2 and resumes to 4 under torchrun
    first = torchrun(2, *args, f"--out_dir={two}", "--max_iters=2")
    assert first.stdout.count("iter 2: train loss") == 1  # only rank 0 prints
    assert "2 processes x 1 micro-steps" in first.stdout
    # and its second half recomputes the blocks in backward (gradient checkpointing): the same numbers, so the same bits
    torchrun(2, *args, f"--out_dir={two}", "--max_iters=4", "--init_from=resume", "--gradient_checkpointing=True")

    a, b = read_log(one), read_log(two)
    assert [r[0] for r in a] == [r[0] for r in b] == [0, 1, 2, 3, 4]
    assert a[-1][2] < a[0][2] - 0.1  # it learns (4 steps, still in warmup)
    assert a == b  # the same losses, to the last digit log.csv keeps
    wa = torch.load(one / "ckpt.pt", weights_only=True)["model"]
    wb = torch.load(two / "ckpt.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bitwise: see ARGS


def test_accumulation_must_divide_among_processes(sample_data, tmp_path):
    # the check runs before the process group starts, so torchrun's variables alone trigger it
    proc = run_script("train.py", *TINY, f"--data_dir={sample_data}", f"--out_dir={tmp_path}",
                      "--gradient_accumulation_steps=3", check=False,
                      env={"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    assert_user_error(proc, "gradient_accumulation_steps=3", "2 processes", "multiple of 2")
    assert not any(tmp_path.iterdir())

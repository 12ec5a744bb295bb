"""Runs that survive: exact resume, Ctrl-C, SIGKILL during a save, a full disk, non-finite losses."""
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import load_checkpoint
from files import save_torch
from conftest import ROOT, SAMPLE, TINY, assert_user_error, run_script

FAST = [*TINY, "--eval_iters=2", "--log_interval=1"]


def train_proc(*args, **popen):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, env=env,
                            text=True, **popen)


def assert_same_tensors(a, b, where="optimizer"):
    """Two nested dicts/lists of tensors and plain values are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# The modern recipe: its optimizer is Muon for the blocks' matrices and AdamW for the rest, so both optimizers'
# states go through the checkpoint (the GPT-2 recipe's plain AdamW is the same torch.optim.AdamW, not wrapped);
# the recipe's model switches change no state that a checkpoint must carry.
MODERN = ["--optimizer=muon", "--lr_schedule=wsd", "--pos_embedding=rope", "--norm=rmsnorm", "--mlp=swiglu",
          "--qk_norm=True"]


@pytest.mark.slow
def test_stopped_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(sample_data, tmp_path):
    common = [*FAST, f"--data_dir={sample_data}", "--dropout=0.1", "--gradient_accumulation_steps=2",
              "--eval_interval=4", "--warmup_iters=3", "--lr_decay_iters=12", *MODERN]
    # the uninterrupted run in a fresh interpreter, the others forked from the warm one (conftest.run_script):
    # processes that differ as a user's do, down to the hash seed
    run_script("train.py", *common, f"--out_dir={tmp_path}/a", "--max_iters=12", fresh=True)
    run_script("train.py", *common, f"--out_dir={tmp_path}/b", "--max_iters=7")  # stops between evaluations
    proc = run_script("train.py", *common, f"--out_dir={tmp_path}/b", "--max_iters=12", "--init_from=resume")
    assert "settings changed since the checkpoint: max_iters 7 -> 12" in proc.stdout
    a = load_checkpoint(tmp_path / "a" / "ckpt.pt")
    b = load_checkpoint(tmp_path / "b" / "ckpt.pt")
    assert a["iter_num"] == b["iter_num"] == 12
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert_same_tensors(a["optimizer"], b["optimizer"])


# Resuming with another model shape or other data is refused: test_recipe.py's
# test_resume_refuses_other_switches_or_another_optimizer (a changed n_layer and norm, one refusal naming both) and
# test_bad_inputs.py's other_vocabulary row (a checkpoint of another tokenizer than the data's).


@pytest.fixture(scope="module")
def two_steps(sample_data, tmp_path_factory):
    """A run of FAST for 2 iterations, evaluated and saved at 2: its out_dir, which tests copy before resuming it."""
    out = tmp_path_factory.mktemp("two_steps") / "o"
    run_script("train.py", *FAST, f"--data_dir={sample_data}", f"--out_dir={out}", "--max_iters=2",
               "--eval_interval=2")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_finishes_the_step_saves_and_exits_0(sig, sample_data, tmp_path):
    # both signals go to one handler (train.StopRequest) and the same save: the resume runs after SIGINT only
    out = tmp_path / "o"
    proc = train_proc(*FAST, f"--data_dir={sample_data}", f"--out_dir={out}", "--max_iters=100000",
                      "--eval_interval=100000")
    for line in proc.stdout:
        if line.startswith("iter 3:"):
            break
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "--init_from=resume" in stdout and "Traceback" not in stderr
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] >= 3
    if sig == signal.SIGINT:
        proc = run_script("train.py", *FAST, f"--data_dir={sample_data}", f"--out_dir={out}",
                          f"--max_iters={ckpt['iter_num'] + 2}", "--eval_interval=100000", "--init_from=resume")
        assert f"resuming from iteration {ckpt['iter_num']}" in proc.stdout


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once(sample_data, tmp_path):
    proc = train_proc(*FAST, f"--data_dir={sample_data}", f"--out_dir={tmp_path}/o", "--max_iters=100000",
                      "--eval_interval=100000", "--batch_size=32", "--block_size=128")  # steps of about a second
    for line in proc.stdout:
        if line.startswith("iter 1:"):
            break
    proc.send_signal(signal.SIGINT)
    for line in proc.stdout:
        if "finishing this step" in line:
            break
    proc.send_signal(signal.SIGINT)  # lands while the step is still running
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == "interrupted", stderr
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(sample_data, tmp_path):
    out = tmp_path / "o"
    args = [*FAST, f"--data_dir={sample_data}", f"--out_dir={out}", "--eval_interval=1", "--eval_iters=1"]
    run_script("train.py", *args, "--max_iters=1")
    def tmp():  # the temporary file of a checkpoint being written
        return list(out.glob(".ckpt.pt.*.tmp"))

    for attempt in range(20):  # until a SIGKILL lands while ckpt.pt is being rewritten
        proc = train_proc(*args, "--max_iters=100000", "--init_from=resume", stdout=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None and not tmp():
            time.sleep(0.0002)
        proc.kill()
        _, stderr = proc.communicate()
        assert "Traceback" not in stderr, stderr
        ckpt = load_checkpoint(out / "ckpt.pt")  # whatever the moment, the checkpoint on disk is complete
        assert ckpt["iter_num"] >= 1
        if tmp():
            break
    assert tmp(), "no kill landed during a save in 20 attempts"


@pytest.mark.slow
def test_prepare_killed_while_writing_leaves_nothing_that_looks_complete(tmp_path, hf_home):
    data = tmp_path / "d"
    cmd = [sys.executable, str(ROOT / "prepare.py"), f"--dataset={SAMPLE}", "--tokenizer=bpe", "--vocab_size=300",
           f"--data_dir={data}", "--num_proc=1", "--shards=100000"]  # many small shards: a longer write
    env = {**os.environ, "HF_HOME": str(hf_home)}
    subprocess.run(cmd, env=env, check=True, capture_output=True)  # a complete, older preparation
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.name != ".lock"}
    proc = subprocess.Popen([*cmd, "--force", "--vocab_size=400"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(data.glob(".*.bin.*.tmp")):
        time.sleep(0.0002)
    proc.kill()
    proc.wait()
    assert list(data.glob(".*.bin.*.tmp")), "the kill did not land during a write"
    # the new files were written aside: the older preparation is still there, complete and usable
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.suffix != ".tmp" and p.name != ".lock"} == before
    proc = run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}/o", "--max_iters=1",
                      "--eval_iters=1")
    assert "done: best validation loss" in proc.stdout


@pytest.mark.slow
def test_full_disk_while_saving_keeps_the_previous_checkpoint(sample_data, two_steps, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(two_steps, out)
    before = (out / "ckpt.pt").read_bytes()
    # ckpt.pt holds AdamW's two moments besides the weights, about 3x best_model_params.pt: at 2x, the weights
    # can still be written and the checkpoint cannot
    limit = 2 * os.path.getsize(out / "best_model_params.pt")

    def small_disk():  # files past `limit` bytes cannot be written, like a disk that fills up
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *FAST, f"--data_dir={sample_data}",
                           f"--out_dir={out}", "--max_iters=4", "--eval_interval=2", "--init_from=resume"],
                          cwd=ROOT, capture_output=True, text=True, preexec_fn=small_disk)
    assert_user_error(proc, f"could not write {out}/ckpt.pt", "previous ckpt.pt is intact")
    assert (out / "ckpt.pt").read_bytes() == before and not list(out.glob("*.tmp"))


def test_save_torch_failure_removes_the_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_torch({"x": 1}, path)

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        save_torch({"x": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"x": 1} and os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.mark.slow
def test_non_finite_losses_skip_steps_then_stop_keeping_the_last_good_checkpoint(sample_data, two_steps, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(two_steps, out)
    proc = run_script("train.py", *FAST, f"--data_dir={sample_data}", f"--out_dir={out}", "--max_iters=40",
                      "--eval_interval=40", "--init_from=resume", "--learning_rate=1e30", "--grad_clip=0",
                      "--max_nonfinite_steps=3", check=False)
    assert_user_error(proc, "3 optimizer steps in a row", "lower learning_rate", "bfloat16")
    assert "step skipped (1 so far)" in proc.stdout
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == 2 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


class _Payload:
    """Pickles as a call to os.system: what a malicious checkpoint from the internet would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_cannot_run_code(tmp_path):
    from configurator import UserError
    marker = tmp_path / "pwned"
    torch.save({"model": _Payload(marker), "model_args": {}, "tokenizer": {}}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()

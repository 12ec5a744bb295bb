"""A run stopped and continued: exact resume, Ctrl-C and SIGTERM, SIGKILL during a save, non-finite steps, a first
run that died before its checkpoint, log.csv's rows and clock across a resume."""
import csv
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import plumbing
from checkpoint import load_checkpoint
from configurator import UserError
from model import GPT, GPTConfig
from conftest import FAST, ROOT, TINY, TINY_ARGS, assert_user_error, read_log, run_script


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
# test_cli_errors.py's other_vocabulary row (a checkpoint of another tokenizer than the data's).


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_finishes_the_step_saves_and_exits_0(sig, sample_data, tmp_path):
    # both signals go to one handler (plumbing.StepGuard) and the same save: the resume runs after SIGINT only
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


def test_weights_or_losses_that_are_not_finite_are_never_saved(monkeypatch):
    model = GPT(GPTConfig(**TINY_ARGS))
    cfg = SimpleNamespace(learning_rate=1e-3, out_dir="out")
    plumbing.check_finite(model, {"train": 4.1, "validation": 4.2}, 10, cfg)
    with pytest.raises(UserError, match="losses are no longer finite at iteration 10, so nothing was saved"):
        plumbing.check_finite(model, {"train": 4.1, "validation": math.nan}, 10, cfg)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = math.inf
    with pytest.raises(UserError, match="weights are no longer finite .*--init_from=resume"):
        plumbing.check_finite(model, {"train": 4.1, "validation": 4.2}, 10, cfg)


@pytest.mark.slow
def test_a_first_run_that_died_before_its_checkpoint_starts_again(tmp_path, tiny_data):
    from conftest import TINY
    from files import save_torch
    out = tmp_path / "out"  # what a run killed after its iteration-0 evaluation leaves
    save_torch({"model": {}, "model_args": {}, "tokenizer": {}, "config": {}, "iter_num": 0},
               out / "best_model_params.pt")
    (out / "log.csv").write_text("iter,tokens\n0,0\n")
    args = [*TINY, f"--data_dir={tiny_data}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2"]
    assert_user_error(run_script("train.py", *args, "--init_from=resume", check=False),
                      "stopped before its first checkpoint", "without --init_from=resume")
    proc = run_script("train.py", *args)
    assert "starting again" in proc.stdout and (out / "ckpt.pt").exists()
    assert_user_error(run_script("train.py", *args, check=False), "already holds a run")  # now a real run


def test_resume_drops_log_rows_past_the_checkpoint(tmp_path):
    log = tmp_path / "log.csv"
    rows = [plumbing.LOG_COLUMNS] + [[i, i * 10, 1, 1, 1, 1, 1e-3, float(i)] for i in (0, 2, 4, 6)]
    with open(log, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    plumbing.start_log(str(log), 4, resume=True)  # killed after logging iteration 6, before its checkpoint
    with open(log, newline="") as f:
        kept = list(csv.reader(f))
    assert [r[0] for r in kept] == ["iter", "0", "2", "4"]
    plumbing.start_log(str(log), 0, resume=False)
    assert log.read_text().strip() == ",".join(plumbing.LOG_COLUMNS)


@pytest.mark.slow  # train.py as a subprocess
def test_elapsed_time_continues_across_a_resume(sample_data, tmp_path):
    args = [*TINY, f"--data_dir={sample_data}", f"--out_dir={tmp_path}/o", "--eval_interval=10", "--eval_iters=1",
            "--lr_decay_iters=40"]
    run_script("train.py", *args, "--max_iters=20")
    run_script("train.py", *args, "--max_iters=40", "--init_from=resume")
    rows = read_log(tmp_path / "o")
    elapsed = [float(rows[it]["elapsed_s"]) for it in (0, 10, 20, 30, 40)]
    assert elapsed == sorted(elapsed)  # the clock of the run, not of each process: it never goes back


@pytest.mark.slow  # prepare.py and train.py as subprocesses
def test_resuming_on_other_data_starts_a_new_best(two_steps, tiny_data, tmp_path):
    from conftest import GPT2_RANKS
    other = tmp_path / "other"  # other stories, in the same vocabulary as the run's data
    run_script("prepare.py", f"--dataset={tiny_data.parent}", f"--tokenizer={GPT2_RANKS}", f"--data_dir={other}",
               "--num_proc=1")
    out = tmp_path / "o"
    shutil.copytree(two_steps, out)
    proc = run_script("train.py", *FAST, f"--data_dir={other}", f"--out_dir={out}", "--max_iters=4",
                      "--eval_interval=2", "--init_from=resume")
    assert "the data differs from the checkpoint's" in proc.stdout and "starts a new best" in proc.stdout
    # the first evaluation on the new data is the best so far, whatever its loss against the old data's
    assert load_checkpoint(out / "best_model_params.pt")["iter_num"] == 4
    # resuming on the same data keeps the best it had
    proc = run_script("train.py", *FAST, f"--data_dir={other}", f"--out_dir={out}", "--max_iters=6",
                      "--eval_interval=2", "--init_from=resume")
    assert "the data differs" not in proc.stdout


def test_notes_before_a_run_name_settings_without_effect_and_many_passes():
    said = []
    cfg = SimpleNamespace(instruct_word_weight=2.0, data_dir="data/x", max_iters=1000, gradient_accumulation_steps=1,
                          batch_size=8)
    meta = {"splits": {"train": {"tokens": 64_000}}}
    plumbing.say_notes(cfg, meta, 32, said.append)  # 1000 x 8 x 32 = 256,000 tokens: 4 passes
    assert len(said) == 2 and "instruct_word_weight=2 has no effect" in said[0]
    assert "4.0 passes over the 64,000 training tokens" in said[1] and "--max_iters=250" in said[1]
    said.clear()
    plumbing.say_notes(SimpleNamespace(**{**vars(cfg), "instruct_word_weight": 1.0, "max_iters": 400}), meta, 32,
                       said.append)  # 1.6 passes, the default weight: nothing to say
    assert said == []


@pytest.mark.parametrize("setting", ["out_dir", "data_dir"])
def test_an_empty_folder_setting_is_refused_before_anything_is_written(setting):
    import runpy
    from configurator import settings_block
    scope = runpy.run_path(str(ROOT / "train.py"))
    cfg = SimpleNamespace(**{k: scope[k] for k in settings_block(ROOT / "train.py")})
    setattr(cfg, setting, "")
    with pytest.raises(UserError, match=f"{setting} is empty: name a folder"):
        plumbing.check_settings(cfg)

"""Runs that survive careless use: locks per folder, planted links, bad weights, values that make no sense."""
import csv
import json
import math
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import files
import train
from checkpoint import load_checkpoint
from files import append_line, atomic_file, lock_dir, save_torch
from configurator import UserError, check_values
from model import GPT, GPTConfig
from prepare import read_meta
from conftest import ROOT, SAMPLE, TINY, assert_user_error, run_script

TINY_ARGS = dict(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=8, dropout=0.0, bias=True)


def hold_lock(folder, shared=False):
    """A child process that locks `folder` as train.py or prepare.py would, then waits to be killed."""
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from files import lock_dir; "
            f"lock_dir({str(folder)!r}, 'train.py', shared={shared}); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def fresh_locks(monkeypatch):
    """This process's held locks start empty and are released after the test."""
    monkeypatch.setattr(files, "_held_locks", {})
    yield
    for fd in files._held_locks.values():
        os.close(fd)


def test_a_second_writer_is_refused_naming_the_first_and_a_killed_one_leaves_no_lock(tmp_path, fresh_locks):
    holder = hold_lock(tmp_path)
    with pytest.raises(UserError, match=rf"in use by another process \(pid {holder.pid}: .*only one train.py"):
        lock_dir(tmp_path, "train.py")
    holder.kill()  # SIGKILL: the kernel releases the lock
    holder.wait()
    lock_dir(tmp_path, "train.py")
    assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()


def test_prepare_cannot_rewrite_data_that_a_training_run_reads(tmp_path, fresh_locks):
    reader = hold_lock(tmp_path, shared=True)  # train.py holds its data_dir shared
    try:
        with pytest.raises(UserError, match="in use by a running train.py, which reads the data"):
            lock_dir(tmp_path, "prepare.py")
        lock_dir(tmp_path, "train.py", shared=True)  # another training run may read it too
    finally:
        reader.kill()
        reader.wait()


def test_lock_refuses_a_folder_that_cannot_be_written(tmp_path, fresh_locks, monkeypatch):
    def denied(*args, **kwargs):  # as for a read-only folder (root ignores chmod, so the refusal is simulated)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(UserError, match="cannot write in .*read-only or not yours"):
        lock_dir(tmp_path / "out", "train.py")


def test_writes_never_follow_planted_links(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("ckpt.pt", "ckpt.pt.tmp", ".ckpt.pt.tmp", "log.csv"):
        (folder / name).symlink_to(outside)
    save_torch({"x": 1}, folder / "ckpt.pt")  # replaces the link at ckpt.pt, never writes through it
    assert not (folder / "ckpt.pt").is_symlink() and torch.load(folder / "ckpt.pt") == {"x": 1}
    with pytest.raises(OSError):
        append_line(folder / "log.csv", "1,2\n")
    assert outside.read_text() == "precious"
    with pytest.raises(RuntimeError):  # a failed write leaves no temporary file behind
        with atomic_file(folder / "meta.json") as f:
            f.write("half")
            raise RuntimeError
    assert sorted(p.name for p in folder.iterdir()) == [".ckpt.pt.tmp", "ckpt.pt", "ckpt.pt.tmp", "log.csv"]


def test_values_that_pass_the_type_check_but_make_no_sense():
    settings = dict(seed=2 ** 64, lr=float("nan"), beta=1.0, steps=0, wd=-0.1)
    for name, kind, message in (("seed", "seed", "seed must be a seed from 0 to 2\\*\\*64 - 1"),
                                ("lr", "rate", "lr must be a finite number above 0, got nan"),
                                ("beta", "fraction", r"beta must be in \[0, 1\), got 1.0"),
                                ("steps", "count", "steps must be at least 1, got 0"),
                                ("wd", "rate0", "wd must be a finite number, 0 or more")):
        with pytest.raises(UserError, match=message):
            check_values(settings, {name: kind})
    check_values(dict(seed=2 ** 64 - 1, lr=1e-3, beta=0.0, steps=1, wd=0.0),
                 dict(seed="seed", lr="rate", beta="fraction", steps="count", wd="rate0"))


def test_checkpoints_and_meta_json_with_wrong_types_are_refused(tmp_path):
    model = GPT(GPTConfig(**TINY_ARGS))
    spec = {"kind": "bpe", "name": "x", "json": "{}", "sha256": "0" * 64}
    for bad, message in (({**TINY_ARGS, "n_layer": "2"}, "n_layer must be int, got str"),
                         ({**TINY_ARGS, "bias": 1}, "bias must be bool"),
                         ({**TINY_ARGS, "heads": 2}, "unexpected keyword"),
                         ([1, 2], "model_args is a list")):
        save_torch({"model": model.state_dict(), "model_args": bad, "tokenizer": spec}, tmp_path / "c.pt")
        with pytest.raises(UserError, match=f"c.pt is damaged or not from this project: .*{message}"):
            load_checkpoint(tmp_path / "c.pt")
    save_torch({"model": model.state_dict(), "model_args": TINY_ARGS, "tokenizer": {**spec, "json": 5}},
                    tmp_path / "c.pt")
    with pytest.raises(UserError, match="lacks text fields json"):
        load_checkpoint(tmp_path / "c.pt")
    from checkpoint import load_model
    save_torch({"model": model.state_dict(), "model_args": TINY_ARGS, "tokenizer": spec}, tmp_path / "c.pt")
    with pytest.raises(UserError, match="tokenizer 'x' cannot be built from its description"):
        load_model(tmp_path / "c.pt")  # spec["json"] is not a tokenizer.json

    meta = {"vocab_size": 64, "dtype": "uint16", "tokenizer": {"sha256": "0" * 64},
            "splits": {s: {"documents": 1, "tokens": 10, "bytes": 40} for s in ("train", "validation")}}
    for s in ("train", "validation"):
        np.zeros(10, np.uint16).tofile(tmp_path / f"{s}.bin")
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert read_meta(tmp_path)[1] == {"train": "", "validation": ""}
    for path, value in ((("splits", "train", "bytes"), 0), (("splits", "validation", "tokens"), "10"),
                        (("vocab_size",), 64.0)):
        broken = json.loads(json.dumps(meta))
        target = broken
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        (tmp_path / "meta.json").write_text(json.dumps(broken))
        with pytest.raises(UserError, match="meta.json is damaged .*not a positive whole number"):
            read_meta(tmp_path)


def test_resume_drops_log_rows_past_the_checkpoint(tmp_path, monkeypatch):
    log = tmp_path / "log.csv"
    rows = [train.LOG_COLUMNS] + [[i, i * 10, 1, 1, 1, 1, 1e-3, float(i)] for i in (0, 2, 4, 6)]
    with open(log, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    monkeypatch.setattr(train, "init_from", "resume")
    train.start_log(str(log), 4)  # killed after logging iteration 6, before its checkpoint
    with open(log, newline="") as f:
        kept = list(csv.reader(f))
    assert [r[0] for r in kept] == ["iter", "0", "2", "4"]
    monkeypatch.setattr(train, "init_from", "scratch")
    train.start_log(str(log), 0)
    assert log.read_text().strip() == ",".join(train.LOG_COLUMNS)


def test_weights_or_losses_that_are_not_finite_are_never_saved(monkeypatch):
    model = GPT(GPTConfig(**TINY_ARGS))
    train.check_finite(model, {"train": 4.1, "validation": 4.2}, 10)
    with pytest.raises(UserError, match="losses are no longer finite at iteration 10, so nothing was saved"):
        train.check_finite(model, {"train": 4.1, "validation": math.nan}, 10)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = math.inf
    with pytest.raises(UserError, match="weights are no longer finite .*--init_from=resume"):
        train.check_finite(model, {"train": 4.1, "validation": 4.2}, 10)


def test_export_force_only_replaces_its_own_folders_compared_by_real_path(tmp_path, monkeypatch):
    import export
    monkeypatch.setattr(export, "force", True)
    run = tmp_path / "out"
    run.mkdir()
    (run / "best_model_params.pt").write_bytes(b"weights")
    (tmp_path / "link").symlink_to(run)  # --out_dir reached through a link to the export_dir
    with pytest.raises(UserError, match="holds the checkpoint"):
        export._check_destination(str(run), str(tmp_path / "link" / "best_model_params.pt"))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="was not written by export.py"):
        export._check_destination(str(other), str(run / "best_model_params.pt"))
    monkeypatch.chdir(other)
    with pytest.raises(UserError, match="was not written by export.py"):
        export._check_destination(".", str(run / "best_model_params.pt"))


class _Trickle(BaseHTTPRequestHandler):
    def do_POST(self):  # answers one byte at a time, each well within a per-read timeout
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass

    def log_message(self, *args):
        pass


def test_judge_timeout_is_a_total_deadline_per_request():
    import judge
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # with a timeout per read, the 1,000 bytes would arrive (in 50 s) and fail to parse instead
        with pytest.raises(UserError, match="did not answer within 0.5 s"):
            judge.chat(f"http://127.0.0.1:{server.server_port}/v1", "m", [], timeout=0.5)
    finally:
        server.shutdown()


@pytest.mark.slow
def test_a_second_train_py_on_one_out_dir_stops_at_once(sample_data, tmp_path):
    holder = hold_lock(tmp_path / "o")
    try:
        proc = run_script("train.py", *TINY, f"--data_dir={sample_data}", f"--out_dir={tmp_path / 'o'}",
                          "--max_iters=2", check=False)
        assert_user_error(proc, "is in use by another process", f"pid {holder.pid}")
        assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_prepare_on_a_full_disk_keeps_the_previous_data(sample_data, tmp_path, hf_home):
    import resource
    import shutil
    import signal
    data = tmp_path / "d"
    shutil.copytree(sample_data, data)
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.name != ".lock"}
    limit = os.path.getsize(data / "validation.bin") + 10_000  # train.bin cannot be written whole

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    from conftest import GPT2_RANKS
    proc = subprocess.run([sys.executable, str(ROOT / "prepare.py"), f"--dataset={SAMPLE}",
                           f"--tokenizer={GPT2_RANKS}", f"--data_dir={data}", "--num_proc=1", "--force"],
                          cwd=ROOT, capture_output=True, text=True, preexec_fn=small_disk,
                          env={**os.environ, "HF_HOME": str(hf_home), "HF_DATASETS_OFFLINE": "1"})
    assert_user_error(proc, f"could not write the prepared data in {data}", "previous data there is unchanged")
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.name != ".lock"} == before  # and no temporary file

"""Files that survive careless use: one writer per folder (an OS lock, released however a process dies), links
planted where a file will be written, a full disk, a failed save, a data_dir that cannot be written."""
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import files
from configurator import UserError
from files import append_line, atomic_file, lock_dir, save_torch
from conftest import FAST, ROOT, TINY, assert_user_error, run_script


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


@pytest.mark.parametrize("errno_", ["EROFS", "EACCES"])
def test_a_read_only_data_dir_needs_no_shared_lock(tmp_path, monkeypatch, errno_):
    import errno
    import files
    real_open = os.open

    def read_only(path, flags, *args):  # what a read-only mount answers (tests may run as root, who may write)
        if str(path).endswith(".lock") and flags & os.O_CREAT:
            raise OSError(getattr(errno, errno_), os.strerror(getattr(errno, errno_)), path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(files.os, "open", read_only)
    (tmp_path / "data").mkdir()
    files.lock_dir(str(tmp_path / "data"), "train.py", shared=True)  # no error: the data cannot be rewritten
    with pytest.raises(UserError, match="cannot write in .*out.*choose a folder you can write to"):
        files.lock_dir(str(tmp_path / "out"), "train.py")


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

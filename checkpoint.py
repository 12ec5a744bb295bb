"""Checkpoint files: writing any file safely, saving and loading train.py's checkpoints, and rebuilding a model
from one.

A checkpoint is a dict saved with torch.save: "model" (state dict), "model_args" (GPTConfig fields),
"tokenizer" (the Tokenizer spec, so a checkpoint decodes without its data directory), "config" (the training
settings), "iter_num" and, in ckpt.pt only, the optimizer, loss-scaler and random-generator states for resuming.
"""

import contextlib
import os
import sys
import tempfile

import torch

from configurator import UserError
from model import GPT, GPTConfig
from tokenizer import Tokenizer, check_spec


class _WriteRecorder:
    """The file object torch.save writes to: it keeps the OSError of a failed write (disk full, file too
    large), which torch itself turns into an unhelpful RuntimeError about file positions."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """Write `path` whole or not at all: yield a new temporary file beside it, opened in `mode` ("w": UTF-8 text,
    "wb": bytes); when the block ends without an error, flush and fsync it, rename it over `path` and fsync the
    directory, so `path` is always either the old file or the complete new one. Creates missing folders.

    The temporary file gets a unique name (`.NAME.XXXXXXXX.tmp`) and is created exclusively (tempfile.mkstemp:
    O_CREAT | O_EXCL, which never follows a symbolic link), and the rename replaces a link at `path` rather than
    writing through it; the file gets the permissions the umask gives new files. On any error (OSError from a full
    disk, Ctrl-C, ...) the temporary file is removed and the error re-raised."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def fsync_dir(folder):
    """fsync a directory, so the renames in it survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def append_line(path, line):
    """Append the str `line` (UTF-8) to `path`, creating it if needed. Opened with O_NOFOLLOW: a symbolic link
    planted at `path` is refused (OSError) instead of written through."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "a", encoding="utf-8", newline="") as f:
        f.write(line)


_held_locks = {}  # real path of a locked folder -> its open lock file: a lock lasts as long as the file is open


def lock_dir(folder, owner, shared=False):
    """Lock `folder` for this process's lifetime with an OS file lock on folder/.lock (flock): one writer at a time,
    or (shared=True) any number of readers while no writer holds it. The kernel releases the lock when the process
    ends, however it ends, so a killed run never leaves a stale lock. An exclusive holder writes its pid and
    command line into the file so that the next one can name it.

    train.py locks its out_dir exclusively and its data_dir shared; prepare.py locks its data_dir exclusively, so
    data cannot be rewritten under a running train.py. An exclusive holder also removes the temporary files
    (atomic_file's .NAME.XXXXXXXX.tmp) that a killed process left. Where the OS has no flock (Windows), nothing
    is locked.

    Args:
        folder: the directory (created if missing, for an exclusive lock). owner: the script's name, for messages.
    Raises:
        UserError: the folder cannot be written (read-only, permissions), or another process holds the lock
            (naming it when it can).
    """
    try:
        import fcntl
    except ImportError:
        return
    if os.path.realpath(folder) in _held_locks:
        return  # this process holds it already (e.g. out_dir and data_dir are one folder)
    lock_path = os.path.join(folder, ".lock")
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    if shared and not os.path.isdir(folder):
        return  # nothing to read there: the caller's own check says so
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(lock_path, flags, 0o666)
    except PermissionError:
        if shared and os.path.isdir(folder) and not os.access(folder, os.W_OK):
            return  # a read-only data directory: nobody without write access can rewrite it either
        raise UserError(f"cannot write in {folder} (read-only or not yours): choose a folder you can write to, "
                        f"or fix its permissions") from None
    except OSError as e:
        raise UserError(f"cannot lock {folder}: {lock_path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        try:  # whoever holds it exclusively left its pid; if a shared lock can be had, only readers hold it
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            writer = None
        except BlockingIOError:
            writer = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "pid unknown"
        os.close(fd)
        if writer is None:
            raise UserError(f"{folder} is in use by a running train.py, which reads the data there: wait for it "
                            f"to end or stop it, or use another folder") from None
        raise UserError(f"{folder} is in use by another process ({writer}): wait for it to end or stop it, or "
                        f"use another folder; only one {owner} may work on a folder at a time") from None
    if not shared:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)}".encode()[:4000], 0)
        for name in os.listdir(folder):  # no one else writes here now: these were left by a killed process
            if name.startswith(".") and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))
    _held_locks[os.path.realpath(folder)] = fd


def save_checkpoint(obj, path):
    """Write `obj` with torch.save through atomic_file: `path` is always the old file or the complete new one.
    Raises OSError when the write fails (e.g. disk full), after removing the temporary file."""
    with atomic_file(path, "wb") as f:
        writer = _WriteRecorder(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def write_text_atomic(text, path):
    """Write the str `text` to `path` (UTF-8) through atomic_file. Raises OSError (the temporary file removed)."""
    with atomic_file(path) as f:
        f.write(text)


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint written by train.py, with `weights_only=True` so that a file from elsewhere can hold
    tensors and plain data but cannot run code.

    Returns:
        dict with "model" (state dict), "model_args" (GPTConfig fields), "tokenizer" (Tokenizer spec),
        "config" (the training settings) and, in ckpt.pt, the optimizer and training state.
    Raises:
        UserError: missing, truncated or corrupt file, or not a checkpoint of this project.
    """
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one with `python train.py config/tinystories_cpu.py` "
                        f"or point --out_dir at the directory that holds it")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args", "tokenizer"} <= ckpt.keys():
        raise UserError(f"{path} is not a checkpoint written by this project's train.py")
    try:
        if not isinstance(ckpt["model_args"], dict):
            raise UserError(f"model_args is a {type(ckpt['model_args']).__name__}, not a dict")
        GPTConfig(**ckpt["model_args"])
        check_spec(ckpt["tokenizer"])
    except (UserError, TypeError) as e:
        raise UserError(f"{path} is damaged or not from this project: {e}") from None
    return ckpt


def model_from_checkpoint(ckpt):
    """Build a GPT from a loaded checkpoint's "model_args" and load its weights. Returns GPT (on the weights'
    device, in train mode). Raises UserError if the weights do not fit the shape."""
    model = GPT(GPTConfig(**ckpt["model_args"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not match its model shape: {str(e).splitlines()[0]}") from None
    return model.to(next(iter(ckpt["model"].values())).device)


def load_model(path, device="cpu"):
    """The model, tokenizer and metadata of a checkpoint, ready for inference: what sample.py, eval.py, export.py
    and serve.py start from.

    Args:
        path: a checkpoint written by train.py (best_model_params.pt or ckpt.pt).
        device: where to put the weights ("cpu", "cuda", "mps", ...).
    Returns:
        (model, tokenizer, ckpt): a GPT in eval mode on `device` with float32 weights, the Tokenizer stored in the
        checkpoint, and the checkpoint dict without its weights and optimizer state (model_args, config,
        iter_num, val_loss, ...).
    Raises:
        UserError: see load_checkpoint and model_from_checkpoint.
    """
    ckpt = load_checkpoint(path, device=device)
    model = model_from_checkpoint(ckpt).eval()
    tok = Tokenizer(ckpt["tokenizer"])
    info = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}
    return model, tok, info

"""Checkpoint files: writing any file safely, saving and loading train.py's checkpoints, and rebuilding a model
from one.

A checkpoint is a dict saved with torch.save: "model" (state dict), "model_args" (GPTConfig fields),
"tokenizer" (the Tokenizer spec, so a checkpoint decodes without its data directory), "config" (the training
settings), "iter_num" and, in ckpt.pt only, the optimizer, loss-scaler and random-generator states for resuming.
"""

import contextlib
import os

import torch

from configurator import UserError
from model import GPT, GPTConfig
from tokenizer import Tokenizer


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
    """Open `path`.tmp (same directory) for writing in `mode` ("w": UTF-8 text, "wb": bytes) and yield it; when the
    block ends without an error, flush and fsync it, rename it over `path` and fsync the directory, so `path` is
    always either the old file or the complete new one. Creates missing folders. On any error (OSError from a
    full disk, Ctrl-C, ...) the temporary file is removed and the error re-raised."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

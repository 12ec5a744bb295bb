"""Checkpoints: writing them (save_checkpoint, for train.py), reading them back checked, and rebuilding a model
from one for inference (sample.py, eval.py, serve.py, export.py), optionally quantized to int8 for the CPU.

A checkpoint is a dict saved with files.save_torch: "model" (state dict), "model_args" (GPTConfig fields),
"tokenizer" (the Tokenizer spec, so a checkpoint decodes without its data directory), "config" (the training
settings), "instruct" (trained on instructed data), "validation" (the size of the validation split it was evaluated
on: documents, tokens, bytes), "iter_num" and, in best_model_params.pt, "val_loss"; in ckpt.pt also "optimizer",
"scaler", "best_val_loss", "rng" (the random generators) and "elapsed_s" for resuming.
"""

import copy
import os
import warnings

import torch
import torch.nn as nn

from configurator import available_memory
from errors import UserError
from files import load_torch, save_torch
from model import GPT, GPTConfig, swiglu_hidden
from tokenizer import Tokenizer, check_spec


def save_checkpoint(path, model, model_args, tokenizer_spec, config, instruct, iter_num, **extra):
    """Write a checkpoint (the dict of this module's docstring) to `path` through files.save_torch: whole or not at
    all. model: the GPT whose state dict is saved; extra: val_loss, or the resume state of ckpt.pt.
    Raises UserError when the file cannot be written (e.g. a full disk): the previous file is intact."""
    state = {"model": model.state_dict(), "model_args": model_args, "tokenizer": tokenizer_spec, "config": config,
             "instruct": instruct, "iter_num": iter_num, **extra}
    try:
        save_torch(state, path)
    except OSError as e:
        raise UserError(f"could not write {path}: {e.strerror or e}; the previous {os.path.basename(path)} is "
                        f"intact: free some space, then continue with --init_from=resume") from None


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint written by train.py (files.load_torch: tensors and plain data only) and check it key by
    key before anything is built from it.

    Returns:
        dict with "model" (state dict of tensors), "model_args" (GPTConfig fields), "tokenizer" (Tokenizer spec),
        "config" (the training settings, a dict) and, in ckpt.pt, the optimizer and training state.
    Raises:
        UserError: missing, truncated or corrupt file, or not a checkpoint of this project.
    """
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: point --out_dir at a training run's folder (each config names "
                        f"its own: `python train.py config/tinystories_cpu.py` writes out-tinystories-cpu)")
    ckpt = load_torch(path, device)
    if not isinstance(ckpt, dict) or not {"model", "model_args", "tokenizer"} <= ckpt.keys():
        raise UserError(f"{path} is not a checkpoint written by this project's train.py")
    try:
        model_config(ckpt["model_args"])
        check_spec(ckpt["tokenizer"])
        check_weights(ckpt["model"], ckpt["model_args"])
        if not isinstance(ckpt.get("config", {}), dict):
            raise UserError("its settings (config) are not a dict")
    except UserError as e:
        raise UserError(f"{path} is damaged or not from this project: {e}") from None
    return ckpt


def model_config(args):
    """The GPTConfig of a checkpoint's "model_args" (a dict from elsewhere). Raises UserError if they are not
    GPTConfig's fields."""
    if not isinstance(args, dict):
        raise UserError(f"model_args is a {type(args).__name__}, not a dict")
    try:
        return GPTConfig(**args)
    except TypeError as e:
        raise UserError(f"model_args do not fit this GPT: {e}") from None


def check_weights(state, model_args):
    """Check a state dict from elsewhere against the model that `model_args` (GPTConfig fields) describe, key by
    key, before any model is allocated: the shapes come from that model built on PyTorch's "meta" device, which
    holds no data. Raises UserError (naming the first differences) when `state` is not a dict of tensors, lacks a
    weight, has one the model does not, or has a weight of another shape."""
    if not isinstance(state, dict):
        raise UserError(f"its weights (the 'model' entry) are a {type(state).__name__}, not a dict of tensors")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"its weights (the 'model' entry) hold entries that are not tensors: "
                        f"{', '.join(map(str, not_tensors[:3]))}")
    n, held = count_params(model_config(model_args)), sum(v.numel() for v in state.values())
    if n > held:  # before building even an empty model of that shape, which takes time in proportion to it
        raise UserError(f"the weights do not fit its model_args: they describe {n:,} parameters, the weights hold "
                        f"{held:,} values")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(model_config(model_args)).state_dict().items()}
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    shapes = [f"{k} is {tuple(state[k].shape)}, not {expected[k]}" for k in expected
              if k in state and tuple(state[k].shape) != expected[k]]
    problems = ([f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"] if missing else []) + \
               ([f"unexpected {', '.join(map(str, extra[:3]))}{' ...' if len(extra) > 3 else ''}"] if extra else []) + \
               shapes[:3]
    if problems:
        raise UserError(f"the weights do not fit its model_args ({'; '.join(problems)})")


def count_params(config):
    """The parameters of GPT(config), counted from the shape alone (GPT.num_params() of the built model: a tied head
    counted once), so that any shape, however large, is counted at once and without memory."""
    C, V, L, bias = config.n_embd, config.vocab_size, config.n_layer, config.bias
    norm = C * (2 if config.norm == "layernorm" and bias else 1)  # gain (and bias)
    hidden = swiglu_hidden(C) if config.mlp == "swiglu" else 4 * C
    fc = hidden * (2 if config.mlp == "swiglu" else 1)  # c_fc's outputs: SwiGLU's gate and up in one matrix
    linears = [(C, 3 * C), (C, C), (C, fc), (hidden, C)]  # (in, out): attention's c_attn, c_proj; the MLP's
    block = (2 * norm + sum(i * o + (o if bias else 0) for i, o in linears)
             + (2 * (C // config.n_head) if config.qk_norm else 0))
    positions = config.block_size * C if config.pos_embedding == "learned" else 0
    return V * C + positions + L * block + norm + (0 if config.tie_embeddings else V * C)


def check_fits(model_args, device, bytes_per_param=4, what="its weights"):
    """Raise UserError, before anything is allocated, when a model of these GPTConfig fields needs more memory than
    `device` has free: parameters (count_params) x bytes_per_param (4: float32 weights; 16 for training with AdamW:
    weights, gradients and two moments). `what` names the need in the message."""
    n = count_params(model_config(model_args))
    need, free = n * bytes_per_param, available_memory(device)
    if free is not None and need > free:
        raise UserError(f"this model has {n / 1e6:,.0f}M parameters: {what} need about {need / 1e9:,.1f} GB, more "
                        f"than the {free / 1e9:,.1f} GB free on {device}: choose a smaller model (n_layer, n_embd, "
                        f"vocab_size)")


def model_from_checkpoint(ckpt):
    """Build a GPT from a loaded checkpoint's "model_args" and load its weights. Returns GPT (on the weights'
    device, in train mode). Raises UserError if the weights do not fit the shape."""
    device = next(iter(ckpt["model"].values())).device
    check_fits(ckpt["model_args"], device)
    model = GPT(model_config(ckpt["model_args"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not match its model shape: {str(e).splitlines()[0]}") from None
    return model.to(device)


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


def quantize_int8(model):
    """Dynamic int8 quantization of every nn.Linear for CPU inference (Jacob et al. 2018; PyTorch's
    `quantize_dynamic`): weights are stored as int8 with one scale per output channel, activations are quantized
    per batch on the fly, and the matmuls run in int8 (fbgemm/x86 kernels). The tied LM head gets its own int8
    copy; the embeddings stay float32. Run the result on CPU in float32 (no autocast).

    Returns a new model (the argument is not changed). PyTorch marks this API deprecated in favour of torchao;
    its deprecation warnings are silenced here since it works and needs no extra dependency."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)

"""Train a GPT on the token streams written by prepare.py.

    python train.py config/tinystories_15m.py --device=mps
    python train.py config/tinystories_cpu.py --data_dir=data/sample --max_iters=100

Every eval_interval iterations it measures the mean loss over eval_iters batches of each split and writes
out_dir/ckpt.pt (everything needed to resume: --init_from=resume) and, when the validation loss improved,
out_dir/best_model_params.pt (what sample.py loads). It logs to out_dir/log.csv and plots out_dir/loss.png.
Losses are cross-entropy in nats per token; bpb is bits per byte of text, which compares across tokenizers.
"""

import csv
import json
import math
import os
import time

import numpy as np
import torch

from configurator import UserError, configure, run
from model import (GPT, GPTConfig, autocast, bits_per_byte, load_checkpoint, resolve_device, save_checkpoint,
                   tokenizer_from_meta)

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"                 # checkpoints, log.csv and loss.png
data_dir = "data/tinystories"   # train.bin, validation.bin and meta.json from prepare.py
init_from = "scratch"           # "scratch", or "resume" from out_dir/ckpt.pt
eval_interval = 250             # iterations between evaluations and checkpoints
eval_iters = 50                 # batches per split in each evaluation
log_interval = 10               # iterations between log lines
# data
batch_size = 32                 # sequences per micro-step
block_size = 256                # tokens per sequence (the context length)
gradient_accumulation_steps = 1  # micro-steps per optimizer step
vocab_size = 0                  # 0: from the data's meta.json; a config that sets it refuses other data
# model
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.0
bias = True                     # biases in Linear layers and LayerNorms
# AdamW
learning_rate = 6e-4            # peak learning rate, reached after warmup_iters
max_iters = 5000                # optimizer steps in total
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                 # clip the gradient's global norm to this; 0 turns clipping off
# learning-rate schedule: linear warmup, then cosine decay to min_lr at lr_decay_iters
warmup_iters = 200
lr_decay_iters = 5000
min_lr = 6e-5
# system
device = "auto"                 # auto, cpu, mps, cuda, cuda:N
dtype = "auto"                  # auto, float32, bfloat16, float16 (autocast precision)
compile = False                 # torch.compile the model
seed = 1337
# -----------------------------------------------------------------------------


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """Learning rate at optimizer step `it`: linear warmup from ~0 to learning_rate over warmup_iters
    (Goyal et al. 2017), cosine decay to min_lr at lr_decay_iters (Loshchilov & Hutter 2017), then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def get_batch(path, dtype, batch_size, block_size, device, generator):
    """Random training windows from a token file.

    Args:
        path: a .bin file from prepare.py; dtype: its numpy dtype (meta.json's "dtype").
        generator: the torch.Generator that picks the window starts (its state is saved with the run).
    Returns:
        x, y: (batch_size, block_size) int64 on `device`; y is x shifted left by one token, so y[b, t] is the
        token that follows x[b, :t+1].
    """
    # A fresh memmap each call: one kept open accumulates resident pages as the whole file is touched.
    data = np.memmap(path, dtype=dtype, mode="r")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
    rows = torch.from_numpy(data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def read_meta(data_dir):
    """Load data_dir/meta.json. Raises UserError pointing at prepare.py when the data is missing."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise UserError(f"no prepared data in {data_dir} (meta.json missing): run "
                        f"`python prepare.py --data_dir={data_dir}` first")
    with open(path) as f:
        meta = json.load(f)
    for split in ("train", "validation"):
        bin_path = os.path.join(data_dir, f"{split}.bin")
        expected = meta["splits"][split]["tokens"] * np.dtype(meta["dtype"]).itemsize
        if not os.path.isfile(bin_path) or os.path.getsize(bin_path) != expected:
            raise UserError(f"{bin_path} is missing or does not match meta.json: re-run prepare.py with --force")
    return meta


def check_settings():
    """Reject settings that would fail late or train badly, before any work starts."""
    if min_lr > learning_rate:
        raise UserError(f"min_lr={min_lr} is larger than learning_rate={learning_rate}: the schedule decays "
                        f"from learning_rate down to min_lr, so set min_lr below it (e.g. learning_rate/10)")
    if lr_decay_iters <= warmup_iters:
        raise UserError(f"lr_decay_iters={lr_decay_iters} must be larger than warmup_iters={warmup_iters}")
    for k in ("batch_size", "block_size", "gradient_accumulation_steps", "max_iters", "eval_interval",
              "eval_iters", "log_interval"):
        if globals()[k] < 1:
            raise UserError(f"{k} must be at least 1, got {globals()[k]}")
    if init_from not in ("scratch", "resume"):
        raise UserError(f"init_from must be 'scratch' or 'resume', got {init_from!r}")


def main():
    config = configure(globals(), doc=__doc__)
    check_settings()
    dev, device_type, precision = resolve_device(device, dtype)
    meta = read_meta(data_dir)
    if vocab_size and vocab_size != meta["vocab_size"]:
        command = ("python prepare.py --tokenizer=gpt2" if vocab_size == 50257 else
                   f"python prepare.py --tokenizer=bpe --vocab_size={vocab_size}")
        raise UserError(f"this config is for a vocabulary of {vocab_size} ids but {data_dir} has "
                        f"{meta['vocab_size']}: prepare its data with `{command} --data_dir=DIR` and pass "
                        f"--data_dir=DIR")
    for split in ("train", "validation"):
        if meta["splits"][split]["tokens"] <= block_size:
            raise UserError(f"the {split} split has {meta['splits'][split]['tokens']} tokens, not more than "
                            f"block_size={block_size}: use a smaller block_size or more data")
    tok = tokenizer_from_meta(meta, data_dir)
    existing = [f for f in ("ckpt.pt", "best_model_params.pt") if os.path.exists(os.path.join(out_dir, f))]
    if init_from == "scratch" and existing:
        raise UserError(f"{out_dir} already holds a run ({', '.join(existing)}): continue it with "
                        f"--init_from=resume, or start a new one with another --out_dir (or delete {out_dir})")
    os.makedirs(out_dir, exist_ok=True)
    print(json.dumps(config, indent=1))

    torch.manual_seed(seed)
    batch_rng = torch.Generator().manual_seed(seed)
    model_args = dict(vocab_size=math.ceil(meta["vocab_size"] / 64) * 64,  # padded: faster matmuls; never targets
                      block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout,
                      bias=bias)
    iter_num, best_val_loss, ckpt = 0, float("inf"), None
    if init_from == "resume":
        ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
        changed = {k: (ckpt["model_args"][k], v) for k, v in model_args.items()
                   if k != "dropout" and ckpt["model_args"][k] != v}
        if changed:
            raise UserError("cannot resume: the model shape differs from the checkpoint's ("
                            + ", ".join(f"{k}: {a} there, {b} here" for k, (a, b) in changed.items())
                            + "); use the same settings or a new out_dir")
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    model = GPT(GPTConfig(**model_args))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(dev)
    print(f"{model.num_params() / 1e6:.2f}M parameters ({model.num_params(non_embedding=True) / 1e6:.2f}M "
          f"without embeddings); device {dev}, dtype {precision}")

    optimizer = model.configure_optimizer(weight_decay, learning_rate, (beta1, beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "float16" and device_type == "cuda")
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler.is_enabled() and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        batch_rng.set_state(ckpt["batch_rng"])
        print(f"resuming from iteration {iter_num} (best validation loss {best_val_loss:.4f})")
        ckpt = None  # free the memory
    raw_model = model
    if compile:
        model = torch.compile(model)
    ctx = autocast(device_type, precision)
    bin_dtype = np.dtype(meta["dtype"])
    paths = {s: os.path.join(data_dir, f"{s}.bin") for s in ("train", "validation")}

    def batch(split):
        return get_batch(paths[split], bin_dtype, batch_size, block_size, dev, batch_rng)

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        out = {}
        for split in paths:
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                x, y = batch(split)
                with ctx:
                    losses[k] = model(x, y)[1].item()
            out[split] = losses.mean().item()
        model.train()
        return out

    def checkpoint(kind, **extra):
        state = {"model": raw_model.state_dict(), "model_args": model_args, "tokenizer": tok.spec,
                 "config": config, "iter_num": iter_num, **extra}
        save_checkpoint(state, os.path.join(out_dir, kind))

    log_path = os.path.join(out_dir, "log.csv")
    if init_from == "scratch" or not os.path.exists(log_path):
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(["iter", "tokens", "train_loss", "val_loss", "train_bpb", "val_bpb", "lr",
                                    "elapsed_s"])
    tokens_per_iter = batch_size * block_size * gradient_accumulation_steps
    print(f"{tokens_per_iter:,} tokens per iteration")

    t_start = t_last = time.time()
    steps_since_log = 0
    resumed_at = iter_num if init_from == "resume" else None  # that iteration was evaluated before the stop
    x, y = batch("train")
    while True:
        lr = get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr

        if (iter_num % eval_interval == 0 or iter_num == max_iters) and iter_num != resumed_at:
            losses = estimate_loss()
            bpb = {s: bits_per_byte(losses[s], meta["splits"][s]["tokens"], meta["splits"][s]["bytes"])
                   for s in losses}
            print(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['validation']:.4f}, "
                  f"val bpb {bpb['validation']:.4f}")
            with open(log_path, "a", newline="") as f:
                csv.writer(f).writerow([iter_num, iter_num * tokens_per_iter, f"{losses['train']:.5f}",
                                        f"{losses['validation']:.5f}", f"{bpb['train']:.5f}",
                                        f"{bpb['validation']:.5f}", f"{lr:.3e}", f"{time.time() - t_start:.1f}"])
            if losses["validation"] < best_val_loss:
                best_val_loss = losses["validation"]
                checkpoint("best_model_params.pt", val_loss=best_val_loss)
            if iter_num > 0:
                checkpoint("ckpt.pt", optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                           best_val_loss=best_val_loss, batch_rng=batch_rng.get_state())
            t_last, steps_since_log = time.time(), 0  # evaluation time is not training time
        if iter_num >= max_iters:
            break

        for _ in range(gradient_accumulation_steps):
            with ctx:
                _, loss = model(x, y)
                loss = loss / gradient_accumulation_steps
            x, y = batch("train")  # fetch the next batch while the device works on this one
            scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        steps_since_log += 1

        if iter_num % log_interval == 0:
            lossf = loss.item() * gradient_accumulation_steps  # .item() waits for the device: only when logging
            dt = (time.time() - t_last) / steps_since_log
            t_last, steps_since_log = time.time(), 0
            print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                  f"{tokens_per_iter / dt:,.0f} tokens/s")

    plot_losses(log_path, os.path.join(out_dir, "loss.png"))
    print(f"done: best validation loss {best_val_loss:.4f}; samples: python sample.py --out_dir={out_dir}")


def plot_losses(log_path, png_path):
    """Plot train and validation loss (nats/token) and bits per byte against iteration from log.csv."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    its = [int(r["iter"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, unit, label in ((axes[0], "loss", "loss (nats/token)"), (axes[1], "bpb", "bits per byte")):
        ax.plot(its, [float(r[f"train_{unit}"]) for r in rows], label="train")
        ax.plot(its, [float(r[f"val_{unit}"]) for r in rows], label="validation")
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    run(main)

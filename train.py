"""Train a GPT on the token streams written by prepare.py.

    python train.py config/tinystories_15m.py --device=mps
    python train.py config/tinystories_cpu.py --data_dir=data/sample --max_iters=100
    torchrun --standalone --nproc_per_node=4 train.py config/tinystories_30m.py   # DDP on 4 GPUs of one machine

Every eval_interval iterations it measures the mean loss over eval_iters batches of each split and writes
out_dir/ckpt.pt (everything needed to resume: --init_from=resume) and, when the validation loss improved,
out_dir/best_model_params.pt (what sample.py loads). It logs to out_dir/log.csv and plots out_dir/loss.png.
Losses are cross-entropy in nats per token; bpb is bits per byte of text, which compares across tokenizers.

Under torchrun each process trains a replica with DistributedDataParallel (Li et al. 2020): NCCL on CUDA, gloo on
CPU. gradient_accumulation_steps is the global number of micro-batches per optimizer step; each of the N processes
runs 1/N of them (different batches) and gradients are averaged across processes on the last one only. Only rank 0
prints, writes files and saves checkpoints.
"""

import csv
import hashlib
import json
import math
import os
import random
import shlex
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import UserError, configure, run
from model import (GPT, GPTConfig, autocast, bits_per_byte, keep_freed_memory, load_checkpoint, resolve_device,
                   save_checkpoint, tokenizer_from_meta, write_text_atomic)

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"                 # checkpoints, log.csv and loss.png
data_dir = "data/tinystories"   # train.bin, validation.bin and meta.json from prepare.py
init_from = "scratch"           # "scratch", or "resume" from out_dir/ckpt.pt
eval_interval = 250             # iterations between evaluations and checkpoints
eval_iters = 50                 # batches per split in each evaluation
log_interval = 10               # iterations between log lines
final_eval = False              # at the end, score every validation token with the best weights (eval.py)
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
max_nonfinite_steps = 8         # stop after this many optimizer steps in a row with a non-finite loss/gradient
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
        generator: the torch.Generator that picks the window starts.
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
    try:
        with open(path) as f:
            meta = json.load(f)
        meta["splits"]["train"], meta["splits"]["validation"], meta["tokenizer"], meta["dtype"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}): re-run prepare.py with --force") from None
    if meta["dtype"] not in ("uint16", "uint32") or np.iinfo(meta["dtype"]).max < meta["vocab_size"] - 1:
        raise UserError(f"{path}: token ids of a {meta['vocab_size']}-id vocabulary cannot be stored as "
                        f"{meta['dtype']}: re-run prepare.py with --force")
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
              "eval_iters", "log_interval", "max_nonfinite_steps"):
        if globals()[k] < 1:
            raise UserError(f"{k} must be at least 1, got {globals()[k]}")
    if init_from not in ("scratch", "resume"):
        raise UserError(f"init_from must be 'scratch' or 'resume', got {init_from!r}")


def batch_seed(*key):
    """A 64-bit seed from a key such as (seed, split, iteration, micro_step): batches are a pure function of
    where the run is, so a resumed run draws exactly the batches the uninterrupted run would have drawn."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1


def rng_state():
    """Every random number generator the run touches (dropout uses torch's), as checkpoint-safe values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore the generators saved by rng_state() (CUDA's only when this machine has CUDA)."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopRequest:
    """The first SIGINT (Ctrl-C) or SIGTERM asks the loop to stop after the current optimizer step and save;
    a second one stops at once (KeyboardInterrupt; files being written are left as they were before)."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              f"(press Ctrl-C again to stop at once)", flush=True)


def main():
    config = configure(globals(), doc=__doc__)
    check_settings()
    # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process
    ddp = "RANK" in os.environ
    rank, local_rank, world_size = (int(os.environ.get(k, d)) for k, d in
                                    (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    master = rank == 0
    say = print if master else (lambda *args, **kwargs: None)
    if gradient_accumulation_steps % world_size:
        raise UserError(f"gradient_accumulation_steps={gradient_accumulation_steps} is the global number of "
                        f"micro-batches and must divide among the {world_size} processes: use a multiple of "
                        f"{world_size}")
    micro_steps = gradient_accumulation_steps // world_size  # this process's share of each optimizer step
    dev, device_type, precision = resolve_device(device, dtype)
    if ddp:
        if device_type == "cuda":
            dev = f"cuda:{local_rank}"
            torch.cuda.set_device(dev)
        elif device_type == "mps":
            raise UserError("DDP runs on CUDA (NCCL) or CPU (gloo), not MPS: use --device=cpu or one process")
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    meta = read_meta(data_dir)
    if vocab_size and vocab_size != meta["vocab_size"]:
        command = ("python prepare.py --tokenizer=gpt2" if vocab_size == 50257 else
                   f"python prepare.py --tokenizer=bpe --vocab_size={vocab_size}")
        raise UserError(f"this config is for a vocabulary of {vocab_size} ids but {data_dir} has "
                        f"{meta['vocab_size']}: prepare its data with `{command} --data_dir=DIR` and pass "
                        f"--data_dir=DIR")
    for split in ("train", "validation"):
        n = meta["splits"][split]["tokens"]
        if n <= block_size:
            raise UserError(f"the {split} split has {n} tokens, not more than block_size={block_size}: "
                            f"use a smaller block_size or more data")
    for split in ("train", "validation"):
        n = meta["splits"][split]["tokens"]
        if batch_size * block_size > n:
            raise UserError(f"a batch of {batch_size} x {block_size} = {batch_size * block_size:,} tokens is "
                            f"larger than the {split} split ({n:,} tokens): lower batch_size or block_size")
    tok = tokenizer_from_meta(meta, data_dir)
    model_args = dict(vocab_size=math.ceil(meta["vocab_size"] / 64) * 64,  # padded: faster matmuls; never targets
                      block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout,
                      bias=bias)
    GPTConfig(**model_args)  # shape errors now, before anything is loaded or written
    existing = [f for f in ("ckpt.pt", "best_model_params.pt") if os.path.exists(os.path.join(out_dir, f))]
    if init_from == "scratch" and existing:
        raise UserError(f"{out_dir} already holds a run ({', '.join(existing)}): continue it with "
                        f"--init_from=resume, or start a new one with another --out_dir (or delete {out_dir})")
    iter_num, best_val_loss, ckpt = 0, float("inf"), None
    if init_from == "resume":
        ckpt_path = os.path.join(out_dir, "ckpt.pt")
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["tokenizer"]["sha256"] != tok.spec["sha256"]:
            raise UserError(f"cannot resume: {ckpt_path} was trained with another tokenizer "
                            f"({ckpt['tokenizer']['name']}) than the data in {data_dir} "
                            f"({tok.spec['name']}); resume with the data it was trained on")
        changed = {k: (ckpt["model_args"][k], v) for k, v in model_args.items()
                   if k != "dropout" and ckpt["model_args"][k] != v}
        if changed:
            raise UserError("cannot resume: the model shape differs from the checkpoint's ("
                            + ", ".join(f"{k}: {a} there, {b} here" for k, (a, b) in changed.items())
                            + "); use the same settings or a new out_dir")
        changed = [f"{k} {ckpt['config'].get(k)!r} -> {v!r}" for k, v in config.items()
                   if k != "init_from" and ckpt["config"].get(k) != v]
        if changed:
            say("settings changed since the checkpoint: " + ", ".join(changed))
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    os.makedirs(out_dir, exist_ok=True)
    say(json.dumps(config, indent=1))

    if device_type == "cpu":
        keep_freed_memory()
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**model_args))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(dev)
    say(f"{model.num_params() / 1e6:.2f}M parameters ({model.num_params(non_embedding=True) / 1e6:.2f}M "
          f"without embeddings); device {dev}, dtype {precision}"
        + (f"; {world_size} processes x {micro_steps} micro-steps" if ddp else ""))

    optimizer = model.configure_optimizer(weight_decay, learning_rate, (beta1, beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "float16" and device_type == "cuda")
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler.is_enabled() and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        say(f"resuming from iteration {iter_num} (best validation loss {best_val_loss:.4f})")
        ckpt = None  # free the memory
    if ddp:  # dropout masks differ between processes; a resumed DDP run reseeds them (exact resume: 1 process)
        torch.manual_seed(batch_seed(seed, "dropout", rank, iter_num))
    raw_model = model
    if compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    ctx = autocast(device_type, precision)
    bin_dtype = np.dtype(meta["dtype"])
    paths = {s: os.path.join(data_dir, f"{s}.bin") for s in ("train", "validation")}
    sampler = torch.Generator()

    def batch(split, *where):
        sampler.manual_seed(batch_seed(seed, split, *where))
        return get_batch(paths[split], bin_dtype, batch_size, block_size, dev, sampler)

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over the same eval_iters batches whatever the number of processes (each runs its share)."""
        model.eval()
        out = {}
        for split in paths:
            total = torch.zeros((), dtype=torch.float64, device=dev)
            for k in range(rank, eval_iters, world_size):
                x, y = batch(split, "eval", iter_num, k)
                with ctx:
                    total += model(x, y)[1].double()
            if ddp:
                dist.all_reduce(total)
            out[split] = total.item() / eval_iters
        model.train()
        return out

    def checkpoint(name, **extra):
        if not master:
            return
        path = os.path.join(out_dir, name)
        state = {"model": raw_model.state_dict(), "model_args": model_args, "tokenizer": tok.spec,
                 "config": config, "iter_num": iter_num, **extra}
        try:
            save_checkpoint(state, path)
        except OSError as e:
            raise UserError(f"could not write {path}: {e.strerror or e}; the previous {name} is intact: free "
                            f"some space, then continue with --init_from=resume") from None

    def save_run():
        checkpoint("ckpt.pt", optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                   best_val_loss=best_val_loss, rng=rng_state())

    log_path = os.path.join(out_dir, "log.csv")
    if master and (init_from == "scratch" or not os.path.exists(log_path)):
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(["iter", "tokens", "train_loss", "val_loss", "train_bpb", "val_bpb", "lr",
                                    "elapsed_s"])
    tokens_per_iter = batch_size * block_size * gradient_accumulation_steps
    say(f"{tokens_per_iter:,} tokens per iteration")

    stop = StopRequest()
    t_start = t_last = time.time()
    steps_since_log = skipped = nonfinite_in_a_row = 0
    stopping = False
    resumed_at = iter_num if init_from == "resume" else None  # that iteration was evaluated before the stop
    # micro-batch m of an optimizer step is run by process m // micro_steps: together the processes draw exactly
    # the batches one process with the same gradient_accumulation_steps would
    first = rank * micro_steps
    x, y = batch("train", iter_num, first)
    while True:
        lr = get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr

        if (iter_num % eval_interval == 0 or iter_num == max_iters) and iter_num != resumed_at:
            losses = estimate_loss()
            bpb = {s: bits_per_byte(losses[s], meta["splits"][s]["tokens"], meta["splits"][s]["bytes"])
                   for s in losses}
            say(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['validation']:.4f}, "
                f"val bpb {bpb['validation']:.4f}")
            if master:
                with open(log_path, "a", newline="") as f:
                    csv.writer(f).writerow([iter_num, iter_num * tokens_per_iter, f"{losses['train']:.5f}",
                                            f"{losses['validation']:.5f}", f"{bpb['train']:.5f}",
                                            f"{bpb['validation']:.5f}", f"{lr:.3e}", f"{time.time() - t_start:.1f}"])
            if losses["validation"] < best_val_loss:
                best_val_loss = losses["validation"]
                checkpoint("best_model_params.pt", val_loss=best_val_loss)
            if iter_num > 0:
                save_run()
            t_last, steps_since_log = time.time(), 0  # evaluation time is not training time
        if iter_num >= max_iters:
            break
        if stopping:
            save_run()
            args = " ".join(shlex.quote(a) for a in sys.argv[1:] if not a.startswith("--init_from="))
            launcher = f"torchrun --nproc_per_node={world_size}" if ddp else "python"
            say(f"stopped at iteration {iter_num}; saved {out_dir}/ckpt.pt. Continue with:\n"
                f"  {launcher} train.py {args} --init_from=resume")
            break

        loss_sum = 0.0
        for micro_step in range(micro_steps):
            last = micro_step == micro_steps - 1
            # DDP averages the gradients across processes during backward: only on the last micro-step
            with model.no_sync() if ddp and not last else nullcontext():
                with ctx:
                    _, loss = model(x, y)
                    loss = loss / micro_steps  # the average over processes then makes it 1/gradient_accumulation_steps
                loss_sum = loss_sum + loss.detach()
                # fetch the next batch while the device works on this one
                x, y = batch("train", *((iter_num, first + micro_step + 1) if not last else (iter_num + 1, first)))
                scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        # one host sync per optimizer step: skip a step whose loss or gradient is not finite. With float16 loss
        # scaling, an overflowing gradient is the scaler's business (it lowers the scale and skips the step).
        # Under DDP the processes agree on the mean loss and on stopping, so they all take the same decisions.
        status = torch.stack([loss_sum.float(), torch.tensor(float(stop.requested), device=dev)])
        if ddp:
            dist.all_reduce(status)
        loss_sum = status[0] / world_size
        finite = torch.isfinite(loss_sum) & (torch.isfinite(norm) | scaler.is_enabled())
        finite, stopping = torch.stack([finite, status[1] > 0]).tolist()  # the one host sync
        if finite:
            scaler.step(optimizer)
            nonfinite_in_a_row = 0
        else:
            skipped += 1
            nonfinite_in_a_row += 1
            say(f"iter {iter_num}: loss or gradient is not finite; step skipped ({skipped} so far)")
            if nonfinite_in_a_row >= max_nonfinite_steps:
                raise UserError(f"{nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or "
                                f"gradient (iteration {iter_num}): lower learning_rate, keep grad_clip on, and "
                                f"with float16 try --dtype=bfloat16; {out_dir} keeps the last good checkpoint")
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        steps_since_log += 1

        if iter_num % log_interval == 0:
            lossf = loss_sum.item()  # .item() waits for the device: only when logging
            dt = (time.time() - t_last) / steps_since_log
            t_last, steps_since_log = time.time(), 0
            say(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                  f"{tokens_per_iter / dt:,.0f} tokens/s")

    if ddp:
        dist.destroy_process_group()
    if not master or iter_num < max_iters:  # stopped early: the resume command is printed
        return
    plot_losses(log_path, os.path.join(out_dir, "loss.png"))
    if final_eval:
        from eval import exact_loss, loss_summary
        raw_model.load_state_dict(load_checkpoint(os.path.join(out_dir, "best_model_params.pt"), dev)["model"])
        tokens = np.memmap(paths["validation"], dtype=bin_dtype, mode="r")
        res = exact_loss(raw_model, tokens, block_size, block_size // 2, batch_size, dev, ctx)
        split = meta["splits"]["validation"]
        summary = {**loss_summary(res, split["tokens"], split["bytes"]), **res}
        write_text_atomic(json.dumps(summary, indent=1), os.path.join(out_dir, "final_eval.json"))
        print(f"exact validation loss of best_model_params.pt over all {res['tokens_scored']:,} tokens: "
              f"{summary['nats_per_token']:.4f} nats/token, perplexity {summary['perplexity']:.2f}, "
              f"{summary['bits_per_byte']:.4f} bits per byte (final_eval.json)")
    print(f"done: best validation loss {best_val_loss:.4f}"
          + (f"; {skipped} non-finite steps skipped" if skipped else "")
          + f"; samples: python sample.py --out_dir={out_dir}")


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

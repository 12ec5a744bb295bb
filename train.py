"""Train a GPT on the token streams written by prepare.py.

    python train.py config/tinystories_15m.py --device=mps
    python train.py config/tinystories_cpu.py --data_dir=data/sample --max_iters=100
    torchrun --standalone --nproc_per_node=4 train.py config/tinystories_30m.py   # DDP on 4 GPUs of one machine
    python train.py config/tinystories_cpu.py --init_from=out/best_model_params.pt --data_dir=data/my_tales \\
                    --out_dir=out-tales --learning_rate=2e-4   # fine-tune: a new run from a model's weights

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
import io
import json
import math
import os
import random
import shlex
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import check_fits, load_checkpoint
from configurator import UserError, autocast, check_values, configure, resolve_device, run
from files import append_line, atomic_file, load_torch, lock_dir, save_torch, write_text_atomic
from instruct import TrainingWindows
from model import GPT, GPTConfig, padded_vocab_size
from optim import OPTIMIZERS, clip_and_step, configure_optimizer
from prepare import read_meta
from tokenizer import bits_per_byte, tokenizer_from_meta

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"                 # checkpoints, log.csv and loss.png
data_dir = "data/tinystories"   # train.bin, validation.bin and meta.json from prepare.py
init_from = "scratch"           # "scratch", "resume" (out_dir/ckpt.pt), or a checkpoint's path to fine-tune it
eval_interval = 250             # iterations between evaluations and checkpoints
eval_iters = 50                 # batches per split in each evaluation
log_interval = 10               # iterations between log lines
final_eval = False              # at the end, score every validation token with the best weights (eval.py)
wandb_log = False               # also log the evaluations to Weights & Biases (pip install wandb)
wandb_project = "tinystories-gpt"  # the wandb project the run goes to
wandb_run_name = ""             # "": a name chosen by wandb
tensorboard_log = False         # also log them to TensorBoard event files in out_dir/tb (pip install tensorboard)
# data
batch_size = 32                 # sequences per micro-step
block_size = 256                # tokens per sequence (the context length)
gradient_accumulation_steps = 1  # micro-steps per optimizer step
vocab_size = 0                  # 0: from the data's meta.json; a config that sets it refuses other data
# model
n_layer = 6                     # transformer blocks
n_head = 6                      # attention heads per block
n_embd = 384                    # width of the residual stream
dropout = 0.0                   # dropout probability (0: none, as for a model that sees its data about once)
bias = True                     # biases in Linear layers and LayerNorms
# the recipe (docs/recipe.md); the defaults are GPT-2's
pos_embedding = "learned"       # "learned" position table, or "rope" (rotary)
norm = "layernorm"              # "layernorm" or "rmsnorm"
mlp = "gelu"                    # "gelu", "swiglu" or "relu2"
qk_norm = False                 # RMSNorm on queries and keys
tie_embeddings = True           # the head reuses the token embedding
# optimizer
optimizer = "adamw"             # "adamw" for everything, or "muon" for the blocks' matrices and AdamW for the rest
muon_lr = 0.02                  # Muon's peak learning rate (the schedule scales it like learning_rate)
muon_momentum = 0.95            # Muon's momentum
learning_rate = 6e-4            # AdamW's peak learning rate, reached after warmup_iters
max_iters = 5000                # optimizer steps in total
weight_decay = 0.1              # decoupled weight decay of the matrices and embeddings
beta1 = 0.9                     # AdamW's momentum
beta2 = 0.95                    # AdamW's decay of the squared gradients
grad_clip = 1.0                 # clip the gradient's global norm to this; 0 turns clipping off
max_nonfinite_steps = 8         # stop after this many optimizer steps in a row with a non-finite loss/gradient
# learning-rate schedule (get_lr)
lr_schedule = "cosine"          # "cosine" decay to min_lr, or "wsd": constant, then a linear decay at the end
warmup_iters = 200              # steps of linear warmup from 0 to learning_rate
lr_decay_iters = 0              # the step at which the decay reaches min_lr; 0: max_iters, the end of the run
min_lr = 6e-5                   # the learning rate at the end of the decay
decay_frac = 0.2                # wsd: the fraction of lr_decay_iters spent decaying
# system
device = "auto"                 # auto, cpu, mps, cuda, cuda:N
dtype = "auto"                  # auto, float32, bfloat16, float16 (autocast precision)
compile = False                 # torch.compile the model
seed = 1337                     # seeds the weights, the batches and dropout
# data prepared with --instruct (docs/instruct.md)
instruct_word_weight = 1.0      # the loss weight of story tokens that start a word the story's header asked for
# -----------------------------------------------------------------------------


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, schedule="cosine", decay_frac=0.2):
    """Learning rate at optimizer step `it`: linear warmup from ~0 to learning_rate over warmup_iters
    (Goyal et al. 2017), then down to min_lr at lr_decay_iters, then min_lr. The way down is
    "cosine": half a cosine wave (Loshchilov & Hutter 2017), or
    "wsd" (warmup-stable-decay; Hu et al. 2024, "MiniCPM"; Hägele et al. 2024): learning_rate until the last
    decay_frac of lr_decay_iters, then a straight line. The long stretch at the peak learns fastest; the short
    decay at the end then settles the weights, which gives most of the final drop in loss."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    if schedule == "wsd":
        decay_start = max(warmup_iters, lr_decay_iters * (1 - decay_frac))
        if it < decay_start:
            return learning_rate
        return learning_rate + (it - decay_start) / (lr_decay_iters - decay_start) * (min_lr - learning_rate)
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
    return to_device(x, device), to_device(y, device)


@torch.no_grad()
def estimate_loss(model, batch, iter_num, ctx, device):
    """Mean loss (nats/token) of each split over eval_iters batches, batch(split, "eval", iter_num, k) for
    k < eval_iters: the same batches whatever the number of processes, each process running its share.
    Returns {"train": float, "validation": float}."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model.eval()
    out = {}
    for split in ("train", "validation"):
        total = torch.zeros((), dtype=torch.float64, device=device)
        for k in range(rank, eval_iters, world_size):
            x, y = batch(split, "eval", iter_num, k)
            with ctx:
                total += model(x, y)[1].double()
        if dist.is_initialized():
            dist.all_reduce(total)
        out[split] = total.item() / eval_iters
    model.train()
    return out


def main():
    config = configure(globals(), doc=__doc__)
    run = Run(config)  # checks, device and processes, data, the checkpoint to start from, locks, logs, trackers
    dev, ctx = run.device, run.ctx

    # the model, its optimizer, and (for float16) the loss scaler
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**run.model_args))
    run.load_weights(model)  # resuming or fine-tuning: the checkpoint's weights
    model.to(dev)
    opt = configure_optimizer(model, weight_decay, learning_rate, (beta1, beta2), run.device_type, optimizer,
                              muon_lr, muon_momentum)
    peak_lrs = [group["lr"] for group in opt.param_groups]  # the schedule scales each group's own peak
    scaler = torch.amp.GradScaler(run.device_type, enabled=run.precision == "float16" and run.device_type == "cuda")
    run.start(model, opt, scaler)  # resuming: the optimizer's, the scaler's and the random generators' states
    if compile:
        model = torch.compile(model)
    if run.ddp:
        model = DDP(model, device_ids=[local_rank()] if run.device_type == "cuda" else None)

    iter_num = run.iter_num
    x, y, w = run.train_batch(iter_num, run.first)  # w (loss weights): None, except for instructed data
    while True:
        lr = get_lr(iter_num, learning_rate, *run.schedule, min_lr, lr_schedule, decay_frac)
        for group, peak in zip(opt.param_groups, peak_lrs):  # AdamW's groups: lr; Muon's: muon_lr * lr/learning_rate
            group["lr"] = lr * (peak / learning_rate)

        # evaluate both splits, keep the best weights, and save everything needed to resume
        if run.evaluation_due(iter_num):
            losses = estimate_loss(model, run.batch, iter_num, ctx, dev)
            run.evaluated(iter_num, losses, lr)
        if iter_num >= max_iters or run.stopping:
            break

        # forward and backward over the micro-batches: gradients add up across them
        loss_sum = 0.0
        for micro_step in range(run.micro_steps):
            last = micro_step == run.micro_steps - 1
            # DDP averages the gradients across processes during backward: only on the last micro-step
            with model.no_sync() if run.ddp and not last else nullcontext():
                with ctx:
                    _, loss = model(x, y, loss_weights=w)
                    loss = loss / run.micro_steps  # averaged over processes: 1/gradient_accumulation_steps each
                loss_sum = loss_sum + loss.detach()
                # fetch the next batch while the device works on this one
                x, y, w = run.train_batch(*((iter_num, run.first + micro_step + 1) if not last else
                                            (iter_num + 1, run.first)))
                scaler.scale(loss).backward()

        # clip the gradient and update the weights, unless the loss or the gradient is not finite
        clip_and_step(model, opt, scaler, grad_clip,
                      lambda grad_norm: run.agree_on_step(iter_num, loss_sum, grad_norm, scaler))
        iter_num += 1
        run.step_done(iter_num, lr)
    run.end(iter_num)


# ==============================================================================================================
# Plumbing: checks of the settings and the data, processes and devices, resuming, signals, logs and files.
# Nothing below is needed to follow how a GPT learns; all of it is needed for a run that survives mistakes.
# ==============================================================================================================

class Run:
    """Everything around the training loop of main(), so that the loop shows only the learning: the checks of the
    settings and the data, the device and the processes (DDP), the checkpoint a run starts from (resume or
    fine-tune), the locks on out_dir and data_dir, batches, evaluations and their logs and trackers, checkpoints,
    non-finite steps, Ctrl-C, and the end of the run.

    Attributes main uses: device, device_type, precision, ctx (autocast), ddp, micro_steps (this process's share of
    gradient_accumulation_steps), first (its first micro-batch), model_args (GPTConfig fields: the settings, the
    checkpoint's shape when fine-tuning, and the data's vocabulary padded), iter_num (where the run starts),
    schedule (get_lr's warmup and decay end: schedule_span) and stopping (a stop was requested).
    Raises UserError for bad settings, data or checkpoints, before anything is written.
    """

    def __init__(self, config):
        check_settings()
        self.config = config
        self.ddp, self.rank, self.world_size, self.device, self.device_type, self.precision = setup_processes()
        self.master = self.rank == 0
        self.say = print if self.master else (lambda *args, **kwargs: None)
        self.micro_steps = gradient_accumulation_steps // self.world_size
        # micro-batch m of an optimizer step is run by process m // micro_steps: together the processes draw
        # exactly the batches one process with the same gradient_accumulation_steps would
        self.first = self.rank * self.micro_steps
        self.ckpt, shape = load_start_checkpoint(config, self.say)  # None from scratch
        self.block_size = shape.get("block_size", block_size)
        self.meta, self.tok = check_data(self.block_size)  # a shared lock on data_dir: prepare.py cannot rewrite it
        # the model's fields are settings of the same names; the vocabulary is the data's, padded for faster matmuls
        self.model_args = {**{f.name: shape.get(f.name, config[f.name]) for f in fields(GPTConfig)},
                           "vocab_size": padded_vocab_size(self.meta["vocab_size"])}
        GPTConfig(**self.model_args)  # shape errors now, before anything is loaded or written
        check_fits(self.model_args, self.device, 16 if optimizer == "adamw" else 12,
                   "training (weights, gradients and the optimizer's moments)")
        check_resume(config, self.model_args, self.tok, self.say, self.ckpt)
        self.track = Trackers(config, self.master)  # refuses a tracker that is not installed
        if self.master:
            lock_dir(out_dir, "train.py")  # one run per out_dir: a second one stops here
        resume = init_from == "resume"
        self.iter_num, self.best_val_loss = ((self.ckpt["iter_num"], self.ckpt["best_val_loss"]) if resume
                                             else (0, float("inf")))
        self.resumed_at = self.iter_num if resume else None  # that iteration was evaluated before the stop
        os.makedirs(out_dir, exist_ok=True)
        self.say(json.dumps(config, indent=1))
        self.schedule = schedule_span(max_iters, warmup_iters, lr_decay_iters)  # (warmup, decay end) for get_lr
        if self.schedule[0] != warmup_iters:
            self.say(f"warmup_iters={warmup_iters} is not shorter than the run ({max_iters} iterations): warming up "
                     f"over the first {self.schedule[0]} instead")
        self.say(f"learning rate: up to {learning_rate:g} over {self.schedule[0]} iterations, then {lr_schedule} "
                 f"down to {min_lr:g} at iteration {self.schedule[1]}")
        if self.device_type == "cpu":
            keep_freed_memory()
        self.ctx = autocast(self.device_type, self.precision)
        self.paths = {s: os.path.join(data_dir, f"{s}.bin") for s in ("train", "validation")}
        self.windows = (TrainingWindows(np.memmap(self.paths["train"], dtype=self.meta["dtype"], mode="r"),
                                        self.tok, instruct_word_weight) if self.meta.get("instruct") else None)
        self.sampler = torch.Generator()
        self.log_path = os.path.join(out_dir, "log.csv")
        self.tokens_per_iter = batch_size * self.block_size * gradient_accumulation_steps
        self.stop = StopRequest()
        self.stopping = False
        self.skipped = self.nonfinite_in_a_row = self.steps_since_log = 0
        self.loss = None

    def load_weights(self, model):
        """Load the starting checkpoint's weights into `model` (a GPT of model_args): resuming or fine-tuning."""
        if self.ckpt is not None:
            model.load_state_dict(self.ckpt["model"])

    def start(self, model, opt, scaler):
        """Note the model, optimizer and scaler that checkpoints save; resuming, restore their states and the
        random generators' from ckpt.pt; start log.csv; print what trains where."""
        self.model, self.opt, self.scaler = model, opt, scaler
        n, world = model.num_params(), self.world_size
        self.say(f"{n / 1e6:.2f}M parameters ({model.num_params(non_embedding=True) / 1e6:.2f}M without "
                 f"embeddings); device {self.device}, dtype {self.precision}"
                 + (f"; {world} processes x {self.micro_steps} micro-steps" if self.ddp else ""))
        elapsed = 0.0
        if init_from == "resume":
            restore_training_state(self.ckpt, opt, scaler)
            elapsed = self.ckpt.get("elapsed_s", 0.0)
            self.say(f"resuming from iteration {self.iter_num} (best validation loss {self.best_val_loss:.4f})")
        elif self.ckpt is not None:
            self.say(f"fine-tuning {init_from} (iteration {self.ckpt['iter_num']} of its run) with a fresh optimizer")
        self.ckpt = None  # free the memory
        if self.ddp:  # dropout masks differ between processes; a resumed DDP run reseeds them (exact resume: 1 process)
            torch.manual_seed(batch_seed(seed, "dropout", self.rank, self.iter_num))
        if self.master:
            start_log(self.log_path, self.iter_num)
        self.say(f"{self.tokens_per_iter:,} tokens per iteration")
        self.t_start = time.time() - elapsed
        self.t_last = time.time()

    def batch(self, split, *where):
        """A batch (x, y) of `split`, each (batch_size, block_size) int64 on the device: a pure function of where
        the run is (see batch_seed), so a resumed run draws the batches the uninterrupted one would have."""
        self.sampler.manual_seed(batch_seed(seed, split, *where))
        return get_batch(self.paths[split], self.meta["dtype"], batch_size, self.block_size, self.device,
                         self.sampler)

    def train_batch(self, iter_num, micro_step):
        """The training batch (x, y, w) of a micro-step: batch("train", ...) and w None, or for data prepared with
        --instruct, windows that hold their stories' headers (instruct.TrainingWindows, from the same window
        starts) and w, (batch_size, block_size) float32 loss weights that weigh up the asked-for words."""
        if self.windows is None:
            return (*self.batch("train", iter_num, micro_step), None)
        self.sampler.manual_seed(batch_seed(seed, "train", iter_num, micro_step))
        data = np.memmap(self.paths["train"], dtype=self.meta["dtype"], mode="r")
        starts = torch.randint(len(data) - self.block_size, (batch_size,), generator=self.sampler).numpy()
        return tuple(to_device(torch.from_numpy(a), self.device) for a in self.windows(data, starts, self.block_size))

    def evaluation_due(self, iter_num):
        """Whether to evaluate before step `iter_num`: every eval_interval and at the end, not twice at a resume."""
        return (iter_num % eval_interval == 0 or iter_num == max_iters) and iter_num != self.resumed_at

    def evaluated(self, iter_num, losses, lr):
        """After an evaluation (losses: nats/token per split): print and log it, save best_model_params.pt when the
        validation loss improved and ckpt.pt after step 0. Raises UserError for weights that are no longer
        finite (nothing is saved then)."""
        splits = self.meta["splits"]
        bpb = {s: bits_per_byte(losses[s], splits[s]["tokens"], splits[s]["bytes"]) for s in losses}
        self.say(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['validation']:.4f}, "
                 f"val bpb {bpb['validation']:.4f}")
        check_finite(self.model, losses, iter_num)
        if self.master:
            row = {"tokens": iter_num * self.tokens_per_iter, "train_loss": losses["train"],
                   "val_loss": losses["validation"], "train_bpb": bpb["train"], "val_bpb": bpb["validation"],
                   "lr": lr, "elapsed_s": time.time() - self.t_start}
            append_log(self.log_path, iter_num, row)
            self.track(iter_num, row)
        if losses["validation"] < self.best_val_loss:
            self.best_val_loss = losses["validation"]
            self.save("best_model_params.pt", iter_num, val_loss=self.best_val_loss)
        if iter_num > 0:
            self.save_run(iter_num)
        self.t_last, self.steps_since_log = time.time(), 0  # evaluation time is not training time

    def save(self, name, iter_num, **extra):
        """Write out_dir/name (rank 0 only; the other processes hold the same weights)."""
        if self.master:
            save_weights(os.path.join(out_dir, name), {
                "model": self.model.state_dict(), "model_args": self.model_args, "tokenizer": self.tok.spec,
                "config": self.config, "instruct": bool(self.meta.get("instruct")),  # see instruct.py
                "iter_num": iter_num, **extra})

    def save_run(self, iter_num):
        """Write ckpt.pt: everything --init_from=resume needs."""
        self.save("ckpt.pt", iter_num, optimizer=self.opt.state_dict(), scaler=self.scaler.state_dict(),
                  best_val_loss=self.best_val_loss, rng=rng_state(), elapsed_s=time.time() - self.t_start)

    def agree_on_step(self, iter_num, loss_sum, grad_norm, scaler):
        """Whether to apply the optimizer step whose micro-batch losses add up to loss_sum (0-d tensor) and whose
        gradient norm is grad_norm: not when either is non-finite (counted; after max_nonfinite_steps in a row,
        UserError). Also notes a stop request (all processes agree: agree_on_step)."""
        self.loss, finite, self.stopping = agree_on_step(loss_sum, grad_norm, scaler, self.stop, self.ddp,
                                                         self.world_size, self.device)
        if finite:
            self.nonfinite_in_a_row = 0
            return True
        self.skipped += 1
        self.nonfinite_in_a_row += 1
        self.say(f"iter {iter_num}: loss or gradient is not finite; step skipped ({self.skipped} so far)")
        if self.nonfinite_in_a_row >= max_nonfinite_steps:
            raise UserError(f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or "
                            f"gradient (iteration {iter_num}): lower learning_rate, keep grad_clip on, and "
                            f"with float16 try --dtype=bfloat16; {out_dir} keeps the last good checkpoint")
        return False

    def step_done(self, iter_num, lr):
        """After optimizer step iter_num - 1: every log_interval steps, print the loss and the speed."""
        self.steps_since_log += 1
        if iter_num % log_interval:
            return
        lossf = self.loss.item()  # .item() waits for the device: only when logging
        dt = (time.time() - self.t_last) / self.steps_since_log
        self.t_last, self.steps_since_log = time.time(), 0
        self.say(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                 f"{self.tokens_per_iter / dt:,.0f} tokens/s")
        self.track(iter_num, {"step_loss": lossf, "tokens_per_s": self.tokens_per_iter / dt})

    def end(self, iter_num):
        """After the loop: a run stopped early saves ckpt.pt and prints its resume command; a finished one plots
        log.csv and (final_eval) scores the validation split with the best weights."""
        if iter_num < max_iters:
            self.save_run(iter_num)
            self.say(f"stopped at iteration {iter_num}; saved {out_dir}/ckpt.pt. Continue with:\n  {resume_command()}")
        self.track.close()
        if self.ddp:
            dist.destroy_process_group()
        if self.master and iter_num >= max_iters:
            finish(self.model, self.best_val_loss, self.skipped, self.log_path, self.meta, self.device, self.ctx,
                   self.block_size)


def schedule_span(max_iters, warmup_iters, lr_decay_iters):
    """The warmup and the end of the decay that get_lr uses: (warmup_iters, lr_decay_iters), in optimizer steps.

    lr_decay_iters=0 (the default) ends the decay with the run, at max_iters, so --max_iters alone moves the whole
    schedule; a warmup as long as that run or longer (a config's warmup, on a run shortened with --max_iters) is
    cut to a tenth of it, so that every run reaches its peak and then decays. An lr_decay_iters set explicitly is
    kept (check_settings has checked it is larger than warmup_iters). Resuming with another max_iters therefore
    stretches or shortens the rest of a default schedule."""
    if lr_decay_iters:
        return warmup_iters, lr_decay_iters
    return (warmup_iters if warmup_iters < max_iters else max_iters // 10), max_iters


def check_settings():
    """Reject settings that would fail late or train badly, before any work starts: each value against its kind
    (configurator.check_values), then the settings that must agree with each other. Raises UserError."""
    check_values(globals(), {
        **dict.fromkeys(("batch_size", "block_size", "gradient_accumulation_steps", "max_iters", "eval_interval",
                         "eval_iters", "log_interval", "max_nonfinite_steps", "n_layer", "n_head", "n_embd"), "count"),
        **dict.fromkeys(("warmup_iters", "lr_decay_iters", "vocab_size"), "count0"),
        **dict.fromkeys(("learning_rate", "muon_lr"), "rate"),
        **dict.fromkeys(("min_lr", "weight_decay", "grad_clip"), "rate0"), "instruct_word_weight": "rate",
        **dict.fromkeys(("beta1", "beta2", "dropout", "muon_momentum"), "fraction"), "seed": "seed"})
    if min_lr > learning_rate:
        raise UserError(f"min_lr={min_lr} is larger than learning_rate={learning_rate}: the schedule decays "
                        f"from learning_rate down to min_lr, so set min_lr below it (e.g. learning_rate/10)")
    if lr_decay_iters and lr_decay_iters <= warmup_iters:
        raise UserError(f"lr_decay_iters={lr_decay_iters} must be larger than warmup_iters={warmup_iters} "
                        f"(or 0: the decay ends with the run)")
    if init_from not in ("scratch", "resume") and not os.path.isfile(init_from):
        hint = (f"; name a file in that directory, e.g. {os.path.join(init_from, 'best_model_params.pt')}"
                if os.path.isdir(init_from) else ": no such file")
        raise UserError(f"init_from={init_from!r} is not 'scratch', 'resume' or a checkpoint file{hint}")
    for k, allowed in (("optimizer", OPTIMIZERS), ("lr_schedule", ("cosine", "wsd"))):
        if globals()[k] not in allowed:
            raise UserError(f"{k}={globals()[k]!r} is not one of {', '.join(map(repr, allowed))}")
    if not 0 < decay_frac <= 1:
        raise UserError(f"decay_frac is the fraction of lr_decay_iters spent decaying and must be in (0, 1], "
                        f"got {decay_frac}")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if gradient_accumulation_steps % world_size:
        raise UserError(f"gradient_accumulation_steps={gradient_accumulation_steps} is the global number of "
                        f"micro-batches and must divide among the {world_size} processes: use a multiple of "
                        f"{world_size}")


def local_rank():
    """This process's GPU index on its machine under torchrun (LOCAL_RANK), 0 for a single process."""
    return int(os.environ.get("LOCAL_RANK", 0))


def setup_processes():
    """Resolve the device and, under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE), join the process
    group: NCCL on CUDA, gloo on CPU. Returns (ddp, rank, world_size, device, device_type, precision).
    Raises UserError for an unavailable device or DDP on MPS."""
    ddp = "RANK" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev, device_type, precision = resolve_device(device, dtype)
    if ddp:
        if device_type == "cuda":
            dev = f"cuda:{local_rank()}"
            torch.cuda.set_device(dev)
        elif device_type == "mps":
            raise UserError("DDP runs on CUDA (NCCL) or CPU (gloo), not MPS: use --device=cpu or one process")
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return ddp, rank, world_size, dev, device_type, precision


def check_data(block_size):
    """The prepared data in data_dir, checked against the settings and the run's block_size (the checkpoint's
    when fine-tuning). Returns (meta, Tokenizer).
    Raises UserError: missing or damaged data, a vocabulary other than the config's, or splits too small for
    one batch."""
    lock_dir(data_dir, "train.py", shared=True)
    meta, _ = read_meta(data_dir)
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
    return meta, tokenizer_from_meta(meta, data_dir)


def load_start_checkpoint(config, say):
    """The checkpoint this run starts from: None from scratch, out_dir/ckpt.pt to resume, the file init_from names
    to fine-tune. Loaded before the data is checked, because a fine-tuned model keeps the shape of the checkpoint:
    its n_layer, n_head, n_embd, block_size, bias and recipe replace the settings (a printed line lists those
    that differ; dropout is the setting's, and `config` keeps the settings as given). Learned positions leave no
    choice for block_size. Resuming a fine-tuned run takes the shape from ckpt.pt the same way, except for the
    settings changed since the run started (check_resume refuses those).
    Returns (checkpoint dict or None, {GPTConfig field: the checkpoint's value} for the fields it decides).
    Raises UserError for a missing or unreadable checkpoint."""
    if init_from == "scratch":
        return None, {}
    if init_from == "resume" and not os.path.exists(os.path.join(out_dir, "ckpt.pt")) and died_before_checkpoint():
        raise UserError(f"{out_dir} has no ckpt.pt: its run stopped before its first checkpoint (written at the "
                        f"first evaluation after iteration 0), so there is nothing to resume; start it again with "
                        f"the same command without --init_from=resume")
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt") if init_from == "resume" else init_from)
    shape = {k: v for k, v in ckpt["model_args"].items() if k in config and k not in ("vocab_size", "dropout")
             and (init_from != "resume" or ckpt["config"].get(k) == config[k])}  # changed since: check_resume refuses
    changed = [f"{k}={v!r} (not {config[k]!r})" for k, v in shape.items() if config[k] != v]
    if changed:
        say("the model shape is the checkpoint's: " + ", ".join(changed))
    return ckpt, shape


def check_resume(config, model_args, tok, say, ckpt):
    """Check the checkpoint from load_start_checkpoint against this run: the same tokenizer and model shape;
    resuming, changed training settings are listed. A new run (from scratch or fine-tuning) needs an out_dir
    that holds no run. Raises UserError for an out_dir that already holds a run, or a checkpoint that does not
    fit."""
    existing = [f for f in ("ckpt.pt", "best_model_params.pt") if os.path.exists(os.path.join(out_dir, f))]
    if init_from != "resume" and existing == ["best_model_params.pt"] and died_before_checkpoint():
        say(f"{out_dir} holds only the iteration-0 weights of a run that stopped before its first checkpoint: "
            f"starting again")
        existing = []
    if init_from != "resume" and existing:
        raise UserError(f"{out_dir} already holds a run ({', '.join(existing)}): continue it with "
                        f"--init_from=resume, or start a new one with another --out_dir (or delete {out_dir})")
    if ckpt is None:
        return
    resume = init_from == "resume"
    verb, path = ("resume", os.path.join(out_dir, "ckpt.pt")) if resume else ("fine-tune", init_from)
    if ckpt["tokenizer"]["sha256"] != tok.spec["sha256"]:
        fix = ("resume with the data it was trained on" if resume else f"prepare your text with its tokenizer, "
               f"`python prepare.py --tokenizer={path} --dataset=YOUR_TEXT --data_dir=DIR`, and pass --data_dir=DIR")
        raise UserError(f"cannot {verb}: {path} was trained with another tokenizer ({ckpt['tokenizer']['name']}) "
                        f"than the data in {data_dir} ({tok.spec['name']}); {fix}")
    saved = {**asdict(GPTConfig()), **ckpt["model_args"]}  # a checkpoint older than a switch has its default
    changed = {k: (saved[k], v) for k, v in model_args.items() if k != "dropout" and saved[k] != v}
    if changed:
        raise UserError(f"cannot {verb}: the model shape or recipe differs from the checkpoint's ("
                        + ", ".join(f"{k}: {a} there, {b} here" for k, (a, b) in changed.items())
                        + "); use the same settings or a new out_dir")
    was = ckpt["config"].get("optimizer", "adamw")
    if resume and was != optimizer:
        raise UserError(f"cannot resume: {path} was trained with optimizer={was!r}, not {optimizer!r}, and its "
                        f"optimizer state only fits that one; resume with --optimizer={was} or use a new out_dir")
    if resume:
        changed = [f"{k} {ckpt['config'].get(k)!r} -> {v!r}" for k, v in config.items()
                   if k != "init_from" and ckpt["config"].get(k) != v]
        if changed:
            say("settings changed since the checkpoint: " + ", ".join(changed))


def died_before_checkpoint():
    """Whether out_dir holds a run that stopped (killed, out of memory, a power cut) before its first ckpt.pt: no
    ckpt.pt, and a best_model_params.pt of iteration 0, written at the first evaluation, whose weights are the
    starting ones. Nothing is lost by starting such a run again, so the same command may do so."""
    if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        return False
    try:
        best = load_torch(os.path.join(out_dir, "best_model_params.pt"))
    except UserError:
        return False  # unreadable: not ours to replace
    return isinstance(best, dict) and best.get("iter_num") == 0


def agree_on_step(loss_sum, grad_norm, scaler, stop, ddp, world_size, dev):
    """Decide, with one host sync per optimizer step, whether to apply it and whether to stop after it.

    A step whose loss or gradient norm is not finite is skipped. With float16 loss scaling an overflowing gradient
    is the scaler's business (it lowers the scale and skips the step itself). Under DDP the processes first sum
    their losses and stop flags (one all-reduce), so they all take the same decisions.
    Returns (mean loss as a 0-d tensor, apply the step: bool, stop requested: bool)."""
    status = torch.stack([loss_sum.float(), torch.tensor(float(stop.requested), device=dev)])
    if ddp:
        dist.all_reduce(status)
    loss_sum = status[0] / world_size
    finite = torch.isfinite(loss_sum) & (torch.isfinite(grad_norm) | scaler.is_enabled())
    finite, stopping = torch.stack([finite, status[1] > 0]).tolist()  # the one host sync
    return loss_sum, bool(finite), bool(stopping)


def to_device(t, device):
    """A CPU tensor on `device`; to a GPU through pinned memory, so the copy overlaps the work already queued."""
    if device.startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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


def restore_training_state(ckpt, opt, scaler):
    """Load the optimizer, loss-scaler and random-generator states of a ckpt.pt, for an exact resume."""
    opt.load_state_dict(ckpt["optimizer"])
    if scaler.is_enabled() and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])


def resume_command():
    """The command line that continues this run: the same arguments with --init_from=resume."""
    args = " ".join(shlex.quote(a) for a in sys.argv[1:] if not a.startswith("--init_from="))
    launcher = f"torchrun --nproc_per_node={os.environ['WORLD_SIZE']}" if "RANK" in os.environ else "python"
    return f"{launcher} train.py {args} --init_from=resume"


def save_weights(path, state):
    """files.save_torch, with a failed write (e.g. a full disk) as a UserError: the previous file is intact."""
    try:
        save_torch(state, path)
    except OSError as e:
        name = os.path.basename(path)
        raise UserError(f"could not write {path}: {e.strerror or e}; the previous {name} is intact: free "
                        f"some space, then continue with --init_from=resume") from None


LOG_FORMATS = {"tokens": "d", "train_loss": ".5f", "val_loss": ".5f", "train_bpb": ".5f", "val_bpb": ".5f",
               "lr": ".3e", "elapsed_s": ".1f"}  # log.csv's columns after "iter", and how each is written
LOG_COLUMNS = ["iter", *LOG_FORMATS]


def start_log(path, iter_num):
    """Start log.csv for a new run (its header), or continue one: a resumed run keeps only the rows up to its
    checkpoint's iteration (a run killed between a row and its checkpoint would repeat them). The file is
    rewritten whole (files.atomic_file), which also replaces a symbolic link planted at its name."""
    rows = []
    if init_from == "resume" and os.path.isfile(path):
        with open(path, newline="") as f:
            rows = [r for r in list(csv.reader(f))[1:] if r and r[0].isdigit() and int(r[0]) <= iter_num]
    lines = io.StringIO()
    csv.writer(lines).writerows([LOG_COLUMNS, *rows])
    write_text_atomic(lines.getvalue(), path)


def append_log(path, iter_num, row):
    """Append the evaluation at `iter_num` to log.csv: row holds the numbers of LOG_FORMATS (losses in
    nats/token, bits per byte, lr, tokens, seconds). Never through a symbolic link (files.append_line).
    Raises UserError if it cannot be written."""
    line = io.StringIO()
    csv.writer(line).writerow([iter_num, *(format(row[k], spec) for k, spec in LOG_FORMATS.items())])
    try:
        append_line(path, line.getvalue())
    except OSError as e:
        raise UserError(f"could not append to {path}: {e.strerror or e} (a symbolic link there is refused); "
                        f"the checkpoints are intact: fix it, then continue with --init_from=resume") from None


def check_finite(model, losses, iter_num):
    """Raise UserError if the evaluation's losses or any weight are NaN or infinite: such weights are never
    saved, so out_dir keeps the last good checkpoint. (Steps with a non-finite loss or gradient are skipped,
    but a huge learning rate can still step finite gradients into weights that overflow.)"""
    finite = all(math.isfinite(v) for v in losses.values())
    if not finite or not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
        raise UserError(f"the {'weights' if finite else 'losses'} are no longer finite at iteration {iter_num}, so "
                        f"nothing was saved: lower learning_rate (now {learning_rate}) and continue from the last "
                        f"good checkpoint in {out_dir} with --init_from=resume")


class Trackers:
    """The optional experiment trackers, on rank 0: Weights & Biases (wandb_log) and TensorBoard (tensorboard_log,
    event files in out_dir/tb). Each gets the numbers of log.csv's rows (losses in nats/token, bits per byte, lr,
    tokens, elapsed seconds) at every evaluation, and the training loss and tokens/s every log_interval, against
    the iteration. The packages are imported only when asked for, here, so that a missing one is refused before
    anything is written; the trackers open at the first call, once the run holds out_dir. The wandb run lives
    under out_dir/wandb (with WANDB_MODE=offline it stays there, to upload later with `wandb sync`).
    Raises UserError when an asked-for package is not installed, or wandb cannot start a run."""

    def __init__(self, config, master):
        self.config, self.unopened, self.run, self.writer = config, master, None, None
        if wandb_log:
            try:
                import wandb  # noqa: F401 (importable: installed and not broken)
            except ImportError:
                raise UserError("wandb_log=True needs Weights & Biases: pip install wandb") from None
        if tensorboard_log:
            try:
                import torch.utils.tensorboard  # noqa: F401 (needs the tensorboard package)
            except ImportError:  # torch ships the writer; the tensorboard package is separate
                raise UserError("tensorboard_log=True needs TensorBoard: pip install tensorboard") from None

    def _open(self):
        if wandb_log:
            import wandb
            try:
                self.run = wandb.init(project=wandb_project, name=wandb_run_name or None, config=self.config,
                                      dir=out_dir)
            except Exception as e:  # not logged in, no network, ...: wandb's own message says which
                why = (str(e).splitlines() or [""])[0]
                raise UserError(f"wandb could not start a run ({type(e).__name__}: {why}): run `wandb login`, "
                                f"or log offline with WANDB_MODE=offline") from None
        if tensorboard_log:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(out_dir, "tb"))

    def __call__(self, step, values):
        """Log the dict `values` (name -> number) at iteration `step`; on other ranks than 0, nothing."""
        if self.unopened:
            self.unopened = False
            self._open()
        if self.run is not None:
            self.run.log(values, step=step)
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def close(self):
        """Write out what is buffered and end the wandb run."""
        if self.run is not None:
            self.run.finish()
        if self.writer is not None:
            self.writer.close()


def keep_freed_memory():
    """On Linux with glibc, have malloc keep freed memory for reuse instead of returning it to the OS.

    A CPU training step allocates and frees hundreds of MB (the logits over a 50k vocabulary alone are
    tokens x 50,304 floats). glibc serves blocks that large with a fresh mmap each time, so every step faults
    those pages in again: on 2 cores, as much kernel time as the math itself. With mmap off and trimming
    raised, config/tinystories_cpu.py went from 1,069 to 490 ms/iter in bfloat16 (see docs/performance.md).
    The process then keeps its peak resident size. Does nothing where glibc's mallopt is not available."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)            # M_MMAP_MAX = 0: every allocation from the heap
        libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: keep up to 2 GiB free at the top of the heap
    except (OSError, AttributeError):
        pass


def finish(model, best_val_loss, skipped, log_path, meta, dev, ctx, block_size):
    """After the last iteration: plot log.csv to loss.png, with final_eval score every validation token with the
    best weights (eval.py's exact_loss, written to final_eval.json), and print where the stories are."""
    plot_losses(log_path, os.path.join(out_dir, "loss.png"))
    if final_eval:
        from eval import exact_loss, loss_summary
        model.load_state_dict(load_checkpoint(os.path.join(out_dir, "best_model_params.pt"), dev)["model"])
        tokens = np.memmap(os.path.join(data_dir, "validation.bin"), dtype=meta["dtype"], mode="r")
        res = exact_loss(model, tokens, block_size, block_size // 2, batch_size, dev, ctx)
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
    with atomic_file(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    run(main)

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

main() below is the whole of the learning: the model, the optimizer and the loop. What a real run needs around it
(the checks, processes, resuming, locks, signals, logs and checkpoint files) is plumbing.py's, called in a few lines.
"""

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import plumbing
from configurator import configure, run
from fast import speed_up
from model import GPT, GPTConfig
from optim import configure_optimizer

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
gradient_checkpointing = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
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
    return plumbing.to_device(x, device), plumbing.to_device(y, device)


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
    # the checks (settings, data, the checkpoint to start from), the device and processes, out_dir's lock
    s = plumbing.setup(config)
    device, ctx = s.device, s.ctx
    # from here on, Ctrl-C or SIGTERM finishes the current step and saves; it also skips non-finite steps
    guard = plumbing.StepGuard(max_nonfinite_steps, out_dir, s.ddp, s.world_size, s.say)

    # the model, its optimizer, and (for float16) the loss scaler
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**s.model_args))
    if s.ckpt is not None:  # resuming or fine-tuning: the checkpoint's weights
        model.load_state_dict(s.ckpt["model"])
    model.to(device)
    opt = configure_optimizer(model, weight_decay, learning_rate, (beta1, beta2), s.device_type, optimizer,
                              muon_lr, muon_momentum)
    peak_lrs = [group["lr"] for group in opt.param_groups]  # the schedule scales each group's own peak
    scaler = torch.amp.GradScaler(s.device_type, enabled=s.precision == "float16" and s.device_type == "cuda")
    elapsed = plumbing.restore(s, model, opt, scaler)  # resuming: the optimizer's and generators' states
    batches, log = plumbing.Batches(s, get_batch), plumbing.Log(s, elapsed)
    checkpoints = plumbing.Checkpoints(s, model, opt, scaler)

    # the fast path for this device (fast.py), in place: the same weights, the same numbers
    model = speed_up(model, gradient_checkpointing)
    raw_model = model  # the module itself, for the checks and the final evaluation: compile and DDP wrap it
    if compile:
        model = torch.compile(model)
    if s.ddp:
        # the buffers (rotary's angles) are constants: no broadcast, which evaluation on some ranks only would break
        model = DDP(model, device_ids=[plumbing.local_rank()] if s.device_type == "cuda" else None,
                    broadcast_buffers=False)

    iter_num, best_val_loss = s.iter_num, s.best_val_loss
    x, y, w = batches.train(iter_num, s.first)  # w (loss weights): None, except for instructed data
    while True:
        lr = get_lr(iter_num, learning_rate, s.warmup_iters, s.lr_decay_iters, min_lr, lr_schedule, decay_frac)
        for group, peak in zip(opt.param_groups, peak_lrs):  # AdamW's groups: lr; Muon's: muon_lr * lr/learning_rate
            group["lr"] = lr * (peak / learning_rate)

        # evaluate both splits, keep the best weights, and save everything needed to resume (not twice at a resume)
        if (iter_num % eval_interval == 0 or iter_num == max_iters) and iter_num != s.resumed_at:
            losses = estimate_loss(model, batches, iter_num, ctx, device)
            log.evaluation(iter_num, losses, lr, raw_model)
            if losses["validation"] < best_val_loss:
                best_val_loss = losses["validation"]
                checkpoints.best(iter_num, best_val_loss)
            if iter_num > 0:
                checkpoints.run(iter_num, best_val_loss, log.elapsed())
        if iter_num >= max_iters or guard.stopping:
            break

        # forward and backward over the micro-batches: gradients add up across them
        loss_sum = 0.0
        for micro_step in range(s.micro_steps):
            last = micro_step == s.micro_steps - 1
            # DDP averages the gradients across processes during backward: only on the last micro-step
            with model.no_sync() if s.ddp and not last else nullcontext():
                with ctx:
                    _, loss = model(x, y, loss_weights=w)
                    loss = loss / s.micro_steps  # averaged over processes: 1/gradient_accumulation_steps each
                loss_sum = loss_sum + loss.detach()
                # fetch the next batch while the device works on this one
                where = (iter_num, s.first + micro_step + 1) if not last else (iter_num + 1, s.first)
                x, y, w = batches.train(*where)
                scaler.scale(loss).backward()

        # clip the gradient's global norm (Pascanu et al. 2013) and update the weights, unless the loss or the
        # gradient is not finite (or, with float16 loss scaling, the scaler found an overflow)
        scaler.unscale_(opt)  # float16: the true gradients, to clip them
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
        if guard.step_is_sound(iter_num, loss_sum, grad_norm, scaler):
            if scaler.is_enabled():
                scaler.step(opt)
            else:
                opt.step()
        scaler.update()
        opt.zero_grad(set_to_none=True)
        iter_num += 1
        log.step(iter_num, lr, guard.loss)
    plumbing.finish(s, iter_num, raw_model, checkpoints, log, guard, best_val_loss)


if __name__ == "__main__":
    run(main)

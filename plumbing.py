"""Everything around train.py's loop that a run needs to survive mistakes, and nothing a learner needs to follow how
a GPT learns: the checks of the settings and the data, the device and the processes (DDP), the checkpoint a run
starts from (resume or fine-tune), the locks on out_dir and data_dir, the batches' seeds, log.csv, the trackers,
checkpoints, non-finite steps, Ctrl-C, and the end of a run.

train.py calls it in a few lines: `setup` (checks, processes, data, the starting checkpoint, out_dir's lock),
`restore` (a resumed run's states), `Batches`, `Log`, `Checkpoints`, `StepGuard`, and `finish`. The settings are
train.py's, as attributes of `cfg` (setup's `Setup.cfg`; the classes reach it through the Setup `s` they hold).
Each raises UserError (one line, exit code 2) for a mistake of the user's, before anything is lost.
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
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from checkpoint import check_fits, load_checkpoint, save_checkpoint
from configurator import UserError, autocast, check_values, resolve_device
from files import append_line, atomic_file, load_torch, lock_dir, write_text_atomic
from instruct import TrainingWindows
from model import GPTConfig, padded_vocab_size
from optim import check_optimizer
from prepare import read_meta
from tokenizer import Tokenizer, bits_per_byte, tokenizer_from_meta


@dataclass
class Setup:
    """What `setup` decided, for train.py's loop. cfg: the settings as attributes (vars(cfg), a dict, is what
    checkpoints save); device ("cuda:0", "cpu", ...), device_type, precision ("bfloat16", ...) and ctx (autocast);
    ddp, rank, world_size; micro_steps (this process's share of gradient_accumulation_steps) and first (its first
    micro-batch); meta (meta.json) and tok of the data; block_size; model_args (GPTConfig fields: the settings, a
    fine-tuned checkpoint's shape, the data's vocabulary padded); ckpt (the starting checkpoint, or None); iter_num
    and best_val_loss where the run starts, resumed_at (that iteration when resuming: it was evaluated before the
    stop); warmup_iters and lr_decay_iters for get_lr (schedule_span); say: print on rank 0, nothing elsewhere."""
    cfg: SimpleNamespace
    device: str
    device_type: str
    precision: str
    ctx: object
    ddp: bool
    rank: int
    world_size: int
    micro_steps: int
    first: int
    meta: dict
    tok: Tokenizer
    block_size: int
    model_args: dict
    ckpt: object
    iter_num: int
    best_val_loss: float
    resumed_at: object
    warmup_iters: int
    lr_decay_iters: int
    say: object


def setup(config):
    """Check the settings, start the processes, check the data and the starting checkpoint, and lock out_dir, in
    that order: nothing is written before every check has passed. `config`: train.py's settings (a dict).
    Returns a Setup. Raises UserError for bad settings, data or checkpoints, or an out_dir that holds a run."""
    cfg = SimpleNamespace(**config)
    check_settings(cfg)
    ddp, rank, world_size, device, device_type, precision = setup_processes(cfg)
    say = print if rank == 0 else (lambda *args, **kwargs: None)
    ckpt, shape = load_start_checkpoint(cfg, say)  # None from scratch
    block_size = shape.get("block_size", cfg.block_size)
    meta, tok = check_data(cfg, block_size)  # a shared lock on data_dir: prepare.py cannot rewrite it
    # the model's fields are settings of the same names; the vocabulary is the data's, padded for faster matmuls
    model_args = {**{f.name: shape.get(f.name, config[f.name]) for f in fields(GPTConfig)},
                  "vocab_size": padded_vocab_size(meta["vocab_size"])}
    GPTConfig(**model_args)  # shape errors now, before anything is loaded or written
    check_fits(model_args, device, 16 if cfg.optimizer == "adamw" else 12,
               "training (weights, gradients and the optimizer's moments)")
    check_resume(cfg, model_args, tok, say, ckpt)
    Trackers.check_installed(cfg)
    if rank == 0:
        lock_dir(cfg.out_dir, "train.py")  # one run per out_dir: a second one stops here
    resume = cfg.init_from == "resume"
    iter_num, best_val_loss = (ckpt["iter_num"], ckpt["best_val_loss"]) if resume else (0, float("inf"))
    os.makedirs(cfg.out_dir, exist_ok=True)
    say(json.dumps(config, indent=1))
    if resume and data_changed(ckpt, cfg, meta):
        best_val_loss = float("inf")
        say(f"the data differs from the checkpoint's: its best validation loss ({ckpt['best_val_loss']:.4f}) measured "
            f"other text, so the next evaluation starts a new best_model_params.pt")
    say_notes(cfg, meta, block_size, say)
    warmup_iters, lr_decay_iters = schedule_span(cfg.max_iters, cfg.warmup_iters, cfg.lr_decay_iters)
    if warmup_iters != cfg.warmup_iters:
        say(f"warmup_iters={cfg.warmup_iters} is not shorter than the run ({cfg.max_iters} iterations): warming up "
            f"over the first {warmup_iters} instead")
    say(f"learning rate: up to {cfg.learning_rate:g} over {warmup_iters} iterations, then {cfg.lr_schedule} down "
        f"to {cfg.min_lr:g} at iteration {lr_decay_iters}")
    if device_type == "cpu":
        keep_freed_memory()
    micro_steps = cfg.gradient_accumulation_steps // world_size
    # micro-batch m of an optimizer step is run by process m // micro_steps: together the processes draw exactly
    # the batches one process with the same gradient_accumulation_steps would
    return Setup(cfg=cfg, device=device, device_type=device_type, precision=precision,
                 ctx=autocast(device_type, precision), ddp=ddp, rank=rank, world_size=world_size,
                 micro_steps=micro_steps, first=rank * micro_steps, meta=meta, tok=tok, block_size=block_size,
                 model_args=model_args, ckpt=ckpt, iter_num=iter_num, best_val_loss=best_val_loss,
                 resumed_at=iter_num if resume else None, warmup_iters=warmup_iters,
                 lr_decay_iters=lr_decay_iters, say=say)


def say_notes(cfg, meta, block_size, say):
    """Print what a user would want to know before a run starts: a setting that has no effect on this data, and a
    run that will see its training data many times (passes = tokens trained on / tokens in the train split), where
    the validation loss will turn up while the training loss goes on falling."""
    if cfg.instruct_word_weight != 1.0 and not meta.get("instruct"):
        say(f"note: instruct_word_weight={cfg.instruct_word_weight:g} has no effect: the data in {cfg.data_dir} was "
            f"not prepared with --instruct, so no word is weighed")
    passes = cfg.max_iters * cfg.gradient_accumulation_steps * cfg.batch_size * block_size
    passes /= meta["splits"]["train"]["tokens"]
    if passes >= 2:
        train_tokens = meta["splits"]["train"]["tokens"]
        say(f"note: {cfg.max_iters:,} iterations are {passes:.1f} passes over the {train_tokens:,} "
            f"training tokens: the model will see its data many times, and the validation loss will likely turn up "
            f"(overfitting) after about one pass; best_model_params.pt keeps the best. For one pass: "
            f"--max_iters={max(1, int(cfg.max_iters / passes))}")


def restore(s, model, opt, scaler):
    """Print what trains where; resuming, load the optimizer's, the loss scaler's and the random generators' states
    from ckpt.pt. Then drop the checkpoint (its memory). Returns the seconds the run had trained before (0.0 for a
    new run), for log.csv's elapsed_s."""
    n = model.num_params()
    s.say(f"{n / 1e6:.2f}M parameters ({model.num_params(non_embedding=True) / 1e6:.2f}M without embeddings); "
          f"device {s.device}, dtype {s.precision}"
          + (f"; {s.world_size} processes x {s.micro_steps} micro-steps" if s.ddp else ""))
    elapsed = 0.0
    if s.cfg.init_from == "resume":
        opt.load_state_dict(s.ckpt["optimizer"])
        if scaler.is_enabled() and s.ckpt["scaler"]:
            scaler.load_state_dict(s.ckpt["scaler"])
        set_rng_state(s.ckpt["rng"])
        elapsed = s.ckpt.get("elapsed_s", 0.0)
        s.say(f"resuming from iteration {s.iter_num} (best validation loss {s.best_val_loss:.4f})")
    elif s.ckpt is not None:
        s.say(f"fine-tuning {s.cfg.init_from} (iteration {s.ckpt['iter_num']} of its run) with a fresh optimizer")
    s.ckpt = None
    if s.ddp:  # dropout masks differ between processes; a resumed DDP run reseeds them (exact resume: 1 process)
        torch.manual_seed(batch_seed(s.cfg.seed, "dropout", s.rank, s.iter_num))
    s.say(f"{tokens_per_iter(s):,} tokens per iteration")
    return elapsed


def tokens_per_iter(s):
    """Tokens in one optimizer step, across all processes and micro-steps."""
    return s.cfg.batch_size * s.block_size * s.cfg.gradient_accumulation_steps


# ----------------------------------------------------------------------------------------------------------------
# Batches: a pure function of where the run is, so a resumed run draws exactly the batches it would have

def batch_seed(*key):
    """A 64-bit seed from a key such as (seed, split, iteration, micro_step): batches are a pure function of
    where the run is, so a resumed run draws exactly the batches the uninterrupted run would have drawn."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1


def to_device(t, device):
    """A CPU tensor on `device`; to a GPU through pinned memory, so the copy overlaps the work already queued."""
    if device.startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Batches:
    """The run's batches. `get_batch` is train.get_batch (passed in, so that this module does not import train).
    For data prepared with --instruct, training windows hold their stories' headers (instruct.TrainingWindows)."""

    def __init__(self, s, get_batch):
        self.s, self.get_batch, self.sampler = s, get_batch, torch.Generator()
        self.paths = {split: os.path.join(s.cfg.data_dir, f"{split}.bin") for split in ("train", "validation")}
        self.windows = (TrainingWindows(np.memmap(self.paths["train"], dtype=s.meta["dtype"], mode="r"), s.tok,
                                        s.cfg.instruct_word_weight) if s.meta.get("instruct") else None)

    def __call__(self, split, *where):
        """A batch (x, y) of `split`, each (batch_size, block_size) int64 on the device, seeded by `where`
        (e.g. "eval", iteration, k): see batch_seed."""
        self.sampler.manual_seed(batch_seed(self.s.cfg.seed, split, *where))
        return self.get_batch(self.paths[split], self.s.meta["dtype"], self.s.cfg.batch_size, self.s.block_size,
                              self.s.device, self.sampler)

    def train(self, iter_num, micro_step):
        """The training batch (x, y, w) of a micro-step: the batch and w None, or for instructed data windows
        with their headers and w, (batch_size, block_size) float32 loss weights that weigh up the asked-for words."""
        if self.windows is None:
            return (*self("train", iter_num, micro_step), None)
        self.sampler.manual_seed(batch_seed(self.s.cfg.seed, "train", iter_num, micro_step))
        data = np.memmap(self.paths["train"], dtype=self.s.meta["dtype"], mode="r")
        starts = torch.randint(len(data) - self.s.block_size, (self.s.cfg.batch_size,), generator=self.sampler)
        arrays = self.windows(data, starts.numpy(), self.s.block_size)
        return tuple(to_device(torch.from_numpy(a), self.s.device) for a in arrays)


# ----------------------------------------------------------------------------------------------------------------
# Logs: the console, log.csv and the trackers

LOG_FORMATS = {"tokens": "d", "train_loss": ".5f", "val_loss": ".5f", "train_bpb": ".5f", "val_bpb": ".5f",
               "lr": ".3e", "elapsed_s": ".1f"}  # log.csv's columns after "iter", and how each is written
LOG_COLUMNS = ["iter", *LOG_FORMATS]


class Log:
    """Prints and records the run on rank 0: each evaluation (console, log.csv, trackers) and every log_interval
    steps the step's loss and speed. Evaluation time does not count as training time in the speed."""

    def __init__(self, s, elapsed):
        self.s, self.path = s, os.path.join(s.cfg.out_dir, "log.csv")
        self.track = Trackers(s.cfg, s.rank == 0)
        if s.rank == 0:
            start_log(self.path, s.iter_num, s.cfg.init_from == "resume")
        self.t_start, self.t_last, self.steps = time.time() - elapsed, time.time(), 0

    def elapsed(self):
        """Seconds since the run started, including the time before a resume."""
        return time.time() - self.t_start

    def evaluation(self, iter_num, losses, lr, model):
        """Print and record an evaluation (losses: {"train", "validation"} in nats/token). Raises UserError when
        the losses or the weights are no longer finite (nothing is saved then: check_finite)."""
        splits = self.s.meta["splits"]
        bpb = {k: bits_per_byte(losses[k], splits[k]["tokens"], splits[k]["bytes"]) for k in losses}
        self.s.say(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['validation']:.4f}, "
                   f"val bpb {bpb['validation']:.4f}")
        check_finite(model, losses, iter_num, self.s.cfg)
        if self.s.rank == 0:
            row = {"tokens": iter_num * tokens_per_iter(self.s), "train_loss": losses["train"],
                   "val_loss": losses["validation"], "train_bpb": bpb["train"], "val_bpb": bpb["validation"],
                   "lr": lr, "elapsed_s": self.elapsed()}
            append_log(self.path, iter_num, row)
            self.track(iter_num, row)
        self.t_last, self.steps = time.time(), 0

    def step(self, iter_num, lr, loss):
        """After optimizer step iter_num - 1 with mean loss `loss` (0-d tensor): every log_interval steps, print
        the loss and the speed (loss.item() waits for the device, so only then)."""
        self.steps += 1
        if iter_num % self.s.cfg.log_interval:
            return
        lossf, dt = loss.item(), (time.time() - self.t_last) / self.steps
        self.t_last, self.steps = time.time(), 0
        per_s = tokens_per_iter(self.s) / dt
        self.s.say(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, {per_s:,.0f} tokens/s")
        self.track(iter_num, {"step_loss": lossf, "tokens_per_s": per_s})


def start_log(path, iter_num, resume):
    """Start log.csv for a new run (its header), or continue one: a resumed run keeps only the rows up to its
    checkpoint's iteration (a run killed between a row and its checkpoint would repeat them). The file is
    rewritten whole (files.atomic_file), which also replaces a symbolic link planted at its name."""
    rows = []
    if resume and os.path.isfile(path):
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


def check_finite(model, losses, iter_num, cfg):
    """Raise UserError if the evaluation's losses or any weight are NaN or infinite: such weights are never
    saved, so out_dir keeps the last good checkpoint. (Steps with a non-finite loss or gradient are skipped,
    but a huge learning rate can still step finite gradients into weights that overflow.)"""
    finite = all(math.isfinite(v) for v in losses.values())
    if not finite or not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
        raise UserError(f"the {'weights' if finite else 'losses'} are no longer finite at iteration {iter_num}, so "
                        f"nothing was saved: lower learning_rate (now {cfg.learning_rate}) and continue from the "
                        f"last good checkpoint in {cfg.out_dir} with --init_from=resume")


class Trackers:
    """The optional experiment trackers, on rank 0: Weights & Biases (wandb_log) and TensorBoard (tensorboard_log,
    event files in out_dir/tb). Each gets the numbers of log.csv's rows (losses in nats/token, bits per byte, lr,
    tokens, elapsed seconds) at every evaluation, and the training loss and tokens/s every log_interval, against
    the iteration. They open at the first call, once the run holds out_dir. The wandb run lives under
    out_dir/wandb (with WANDB_MODE=offline it stays there, to upload later with `wandb sync`).
    Raises UserError when wandb cannot start a run."""

    def __init__(self, cfg, master):
        self.cfg, self.unopened, self.run, self.writer = cfg, master, None, None

    @staticmethod
    def check_installed(cfg):
        """Raise UserError, before anything is written, when an asked-for tracker's package is not installed."""
        if cfg.wandb_log:
            try:
                import wandb  # noqa: F401 (importable: installed and not broken)
            except ImportError:
                raise UserError("wandb_log=True needs Weights & Biases: pip install wandb") from None
        if cfg.tensorboard_log:
            try:
                import torch.utils.tensorboard  # noqa: F401 (needs the tensorboard package)
            except ImportError:  # torch ships the writer; the tensorboard package is separate
                raise UserError("tensorboard_log=True needs TensorBoard: pip install tensorboard") from None

    def _open(self):
        if self.cfg.wandb_log:
            import wandb
            try:
                self.run = wandb.init(project=self.cfg.wandb_project, name=self.cfg.wandb_run_name or None,
                                      config=vars(self.cfg), dir=self.cfg.out_dir)
            except Exception as e:  # not logged in, no network, ...: wandb's own message says which
                why = (str(e).splitlines() or [""])[0]
                raise UserError(f"wandb could not start a run ({type(e).__name__}: {why}): run `wandb login`, "
                                f"or log offline with WANDB_MODE=offline") from None
        if self.cfg.tensorboard_log:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(self.cfg.out_dir, "tb"))

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


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints

class Checkpoints:
    """Writes out_dir/best_model_params.pt (the weights, what sample.py loads) and out_dir/ckpt.pt (everything
    --init_from=resume needs), on rank 0 only: the other processes hold the same weights. The dict itself is
    checkpoint.py's (save_checkpoint)."""

    def __init__(self, s, model, opt, scaler):
        self.s, self.model, self.opt, self.scaler = s, model, opt, scaler

    def _save(self, name, iter_num, **extra):
        if self.s.rank == 0:
            save_checkpoint(os.path.join(self.s.cfg.out_dir, name), self.model, self.s.model_args,
                            self.s.tok.spec, vars(self.s.cfg), bool(self.s.meta.get("instruct")), iter_num,
                            validation=self.s.meta["splits"]["validation"], **extra)

    def best(self, iter_num, val_loss):
        """Write best_model_params.pt: the weights after iter_num steps, whose validation loss is val_loss."""
        self._save("best_model_params.pt", iter_num, val_loss=val_loss)

    def run(self, iter_num, best_val_loss, elapsed):
        """Write ckpt.pt: the weights and the optimizer's, scaler's and random generators' states."""
        self._save("ckpt.pt", iter_num, optimizer=self.opt.state_dict(), scaler=self.scaler.state_dict(),
                   best_val_loss=best_val_loss, rng=rng_state(), elapsed_s=elapsed)


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


# ----------------------------------------------------------------------------------------------------------------
# Steps that go wrong, and stops

class StepGuard:
    """Decides, with one host sync per optimizer step, whether to apply the step and whether to stop after it.

    A step whose loss or gradient norm is not finite is skipped (counted; after max_nonfinite_steps in a row,
    UserError). With float16 loss scaling an overflowing gradient is the scaler's business (it skips the step
    itself). The first SIGINT (Ctrl-C) or SIGTERM asks the run to stop after the current step and save; a second
    one stops at once (KeyboardInterrupt; files being written are left as they were before). Under DDP the
    processes first sum their losses and stop flags (one all-reduce), so they all take the same decisions.
    train.py and rl.py use it. Args: max_nonfinite_steps, out_dir (for the message), ddp and world_size (the
    processes), say (print on rank 0).
    Attributes: loss (the step's mean loss, 0-d tensor), stopping (a stop was requested), skipped (steps)."""

    def __init__(self, max_nonfinite_steps, out_dir, ddp=False, world_size=1, say=print):
        self.max_nonfinite_steps, self.out_dir, self.ddp, self.world_size, self.say = (
            max_nonfinite_steps, out_dir, ddp, world_size, say)
        self.requested, self.stopping, self.loss = False, False, None
        self.skipped = self.in_a_row = 0
        signal.signal(signal.SIGINT, self.on_signal)
        signal.signal(signal.SIGTERM, self.on_signal)

    def on_signal(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              f"(press Ctrl-C again to stop at once)", flush=True)

    def step_is_sound(self, iter_num, loss_sum, grad_norm, scaler=None):
        """Whether to apply the step whose micro-batch losses add up to loss_sum (0-d tensor) and whose gradient
        norm is grad_norm; also notes a stop request. scaler: the float16 GradScaler, or None without one.
        Raises UserError after too many unsound steps in a row."""
        status = torch.stack([loss_sum.float(), torch.tensor(float(self.requested), device=loss_sum.device)])
        if self.ddp:
            dist.all_reduce(status)
        self.loss = status[0] / self.world_size
        scaling = scaler is not None and scaler.is_enabled()
        finite = torch.isfinite(self.loss) & (torch.isfinite(grad_norm) | scaling)
        finite, self.stopping = (bool(v) for v in torch.stack([finite, status[1] > 0]).tolist())  # the host sync
        if finite:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        self.say(f"iter {iter_num}: loss or gradient is not finite; step skipped ({self.skipped} so far)")
        if self.in_a_row >= self.max_nonfinite_steps:
            raise UserError(f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                            f"(iteration {iter_num}): lower learning_rate, keep grad_clip on, and with float16 try "
                            f"--dtype=bfloat16; {self.out_dir} keeps the last good checkpoint")
        return False


# ----------------------------------------------------------------------------------------------------------------
# The end of a run

def finish(s, iter_num, model, checkpoints, log, guard, best_val_loss):
    """After the loop. A run stopped early saves ckpt.pt and prints its resume command. A finished one plots
    log.csv to loss.png and, with final_eval, scores every validation token with the best weights (eval.py's
    exact_loss, written to final_eval.json); then it prints where the stories are."""
    cfg = s.cfg
    if iter_num < cfg.max_iters:
        checkpoints.run(iter_num, best_val_loss, log.elapsed())
        s.say(f"stopped at iteration {iter_num}; saved {cfg.out_dir}/ckpt.pt. Continue with:\n  {resume_command()}")
    log.track.close()
    if s.ddp:
        dist.destroy_process_group()
    if s.rank != 0 or iter_num < cfg.max_iters:
        return
    plot_losses(log.path, os.path.join(cfg.out_dir, "loss.png"))
    if cfg.final_eval:
        from eval import exact_loss, loss_summary
        model.load_state_dict(load_checkpoint(os.path.join(cfg.out_dir, "best_model_params.pt"), s.device)["model"])
        tokens = np.memmap(os.path.join(cfg.data_dir, "validation.bin"), dtype=s.meta["dtype"], mode="r")
        res = exact_loss(model, tokens, s.block_size, s.block_size // 2, cfg.batch_size, s.device, s.ctx)
        split = s.meta["splits"]["validation"]
        summary = {**loss_summary(res, split["tokens"], split["bytes"]), **res}
        write_text_atomic(json.dumps(summary, indent=1), os.path.join(cfg.out_dir, "final_eval.json"))
        print(f"exact validation loss of best_model_params.pt over all {res['tokens_scored']:,} tokens: "
              f"{summary['nats_per_token']:.4f} nats/token, perplexity {summary['perplexity']:.2f}, "
              f"{summary['bits_per_byte']:.4f} bits per byte (final_eval.json)")
    print(f"done: best validation loss {best_val_loss:.4f}"
          + (f"; {guard.skipped} non-finite steps skipped" if guard.skipped else "")
          + f"; samples: python sample.py --out_dir={cfg.out_dir}")


def resume_command():
    """The command line that continues this run (train.py's or rl.py's): the same arguments with
    --init_from=resume."""
    args = " ".join(shlex.quote(a) for a in sys.argv[1:] if not a.startswith("--init_from="))
    launcher = f"torchrun --nproc_per_node={os.environ['WORLD_SIZE']}" if "RANK" in os.environ else "python"
    return f"{launcher} {os.path.basename(sys.argv[0])} {args} --init_from=resume"


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
    save_figure(fig, png_path)


def save_figure(fig, png_path):
    """Lay out a matplotlib figure, write it to png_path as a PNG (100 dpi) through files.atomic_file (whole or
    not at all, never through a link), and close it. loss.png (plot_losses) and rl.py's rl.png."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_file(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def keep_freed_memory():
    """On Linux with glibc, have malloc keep freed memory for reuse instead of returning it to the OS.

    A CPU training step allocates and frees hundreds of MB (the logits over a 50k vocabulary alone are
    tokens x 50,304 floats). glibc serves blocks that large with a fresh mmap each time, so every step faults
    those pages in again, which on a CPU can cost as much kernel time as the math itself (measured:
    docs/performance.md). With mmap off and trimming raised, freed memory is reused; the process then keeps its
    peak resident size. Does nothing where glibc's mallopt is not available."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)            # M_MMAP_MAX = 0: every allocation from the heap
        libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: keep up to 2 GiB free at the top of the heap
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------------------------
# Checks, before anything is written

def check_settings(cfg):
    """Reject settings that would fail late or train badly, before any work starts: each value against its kind
    (configurator.check_values), then the settings that must agree with each other. The model's shape is
    GPTConfig's to check. Raises UserError."""
    check_values(vars(cfg), {
        **dict.fromkeys(("batch_size", "block_size", "gradient_accumulation_steps", "max_iters", "eval_interval",
                         "eval_iters", "log_interval", "max_nonfinite_steps"), "count"),
        **dict.fromkeys(("warmup_iters", "lr_decay_iters", "vocab_size"), "count0"),
        **dict.fromkeys(("learning_rate", "muon_lr"), "rate"),
        **dict.fromkeys(("min_lr", "weight_decay", "grad_clip"), "rate0"), "instruct_word_weight": "rate",
        **dict.fromkeys(("beta1", "beta2", "dropout", "muon_momentum"), "fraction"), "seed": "seed"})
    if cfg.min_lr > cfg.learning_rate:
        raise UserError(f"min_lr={cfg.min_lr} is larger than learning_rate={cfg.learning_rate}: the schedule decays "
                        f"from learning_rate down to min_lr, so set min_lr below it (e.g. learning_rate/10)")
    if cfg.lr_decay_iters and cfg.lr_decay_iters <= cfg.warmup_iters:
        raise UserError(f"lr_decay_iters={cfg.lr_decay_iters} must be larger than warmup_iters={cfg.warmup_iters} "
                        f"(or 0: the decay ends with the run)")
    for k in ("out_dir", "data_dir"):
        if not getattr(cfg, k).strip():
            raise UserError(f"{k} is empty: name a folder, e.g. --{k}={'out' if k == 'out_dir' else 'data/sample'}")
    if cfg.init_from not in ("scratch", "resume") and not os.path.isfile(cfg.init_from):
        hint = (f"; name a file in that directory, e.g. {os.path.join(cfg.init_from, 'best_model_params.pt')}"
                if os.path.isdir(cfg.init_from) else ": no such file")
        raise UserError(f"init_from={cfg.init_from!r} is not 'scratch', 'resume' or a checkpoint file{hint}")
    check_optimizer(cfg.optimizer)
    if cfg.lr_schedule not in ("cosine", "wsd"):
        raise UserError(f"lr_schedule={cfg.lr_schedule!r} is not one of 'cosine', 'wsd'")
    if not 0 < cfg.decay_frac <= 1:
        raise UserError(f"decay_frac is the fraction of lr_decay_iters spent decaying and must be in (0, 1], "
                        f"got {cfg.decay_frac}")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.gradient_accumulation_steps % world_size:
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is the global number of "
                        f"micro-batches and must divide among the {world_size} processes: use a multiple of "
                        f"{world_size}")


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


def local_rank():
    """This process's GPU index on its machine under torchrun (LOCAL_RANK), 0 for a single process."""
    return int(os.environ.get("LOCAL_RANK", 0))


def setup_processes(cfg):
    """Resolve the device and, under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE), join the process
    group: NCCL on CUDA, gloo on CPU. Returns (ddp, rank, world_size, device, device_type, precision).
    Raises UserError for an unavailable device or DDP on MPS."""
    ddp = "RANK" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev, device_type, precision = resolve_device(cfg.device, cfg.dtype)
    if ddp:
        if device_type == "cuda":
            dev = f"cuda:{local_rank()}"
            torch.cuda.set_device(dev)
        elif device_type == "mps":
            raise UserError("DDP runs on CUDA (NCCL) or CPU (gloo), not MPS: use --device=cpu or one process")
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return ddp, rank, world_size, dev, device_type, precision


def check_data(cfg, block_size):
    """The prepared data in data_dir, checked against the settings and the run's block_size (the checkpoint's
    when fine-tuning). Returns (meta, Tokenizer).
    Raises UserError: missing or damaged data, a vocabulary other than the config's, or splits too small for
    one batch."""
    lock_dir(cfg.data_dir, "train.py", shared=True)
    meta, _ = read_meta(cfg.data_dir)
    if cfg.vocab_size and cfg.vocab_size != meta["vocab_size"]:
        command = ("python prepare.py --tokenizer=gpt2" if cfg.vocab_size == 50257 else
                   f"python prepare.py --tokenizer=bpe --vocab_size={cfg.vocab_size}")
        raise UserError(f"this config is for a vocabulary of {cfg.vocab_size} ids but {cfg.data_dir} has "
                        f"{meta['vocab_size']}: prepare its data with `{command} --data_dir=DIR` and pass "
                        f"--data_dir=DIR")
    for split in ("train", "validation"):
        n = meta["splits"][split]["tokens"]
        if n <= block_size:
            raise UserError(f"the {split} split has {n} tokens, not more than block_size={block_size}: "
                            f"use a smaller block_size or more data")
    for split in ("train", "validation"):
        n = meta["splits"][split]["tokens"]
        if cfg.batch_size * block_size > n:
            raise UserError(f"a batch of {cfg.batch_size} x {block_size} = {cfg.batch_size * block_size:,} tokens "
                            f"is larger than the {split} split ({n:,} tokens): lower batch_size or block_size")
    return meta, tokenizer_from_meta(meta, cfg.data_dir)


def load_start_checkpoint(cfg, say):
    """The checkpoint this run starts from: None from scratch, out_dir/ckpt.pt to resume, the file init_from names to
    fine-tune. Loaded before the data is checked, because a fine-tuned model keeps the shape of the checkpoint:
    its n_layer, n_head, n_embd, block_size, bias and recipe replace the settings (a printed line lists those
    that differ; dropout is the setting's, and `cfg` keeps the settings as given). Learned positions leave no
    choice for block_size. Resuming a fine-tuned run takes the shape from ckpt.pt the same way, except for the
    settings changed since the run started (check_resume refuses those).
    Returns (checkpoint dict or None, {GPTConfig field: the checkpoint's value} for the fields it decides).
    Raises UserError for a missing or unreadable checkpoint."""
    if cfg.init_from == "scratch":
        return None, {}
    resume_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.init_from == "resume" and not os.path.exists(resume_path) and died_before_checkpoint(cfg.out_dir):
        raise UserError(f"{cfg.out_dir} has no ckpt.pt: its run stopped before its first checkpoint (written at the "
                        f"first evaluation after iteration 0), so there is nothing to resume; start it again with "
                        f"the same command without --init_from=resume")
    ckpt = load_checkpoint(resume_path if cfg.init_from == "resume" else cfg.init_from)
    if cfg.init_from == "resume" and "rl" in ckpt:
        raise UserError(f"{resume_path} was written by rl.py: continue that run with `python rl.py "
                        f"--out_dir={cfg.out_dir} --init_from=resume`, or train its model further with train.py "
                        f"from --init_from={os.path.join(cfg.out_dir, 'best_model_params.pt')} into another out_dir")
    # the shape settings the checkpoint decides (those changed since a resumed run started: check_resume refuses)
    shape = {k: v for k, v in ckpt["model_args"].items() if hasattr(cfg, k) and k not in ("vocab_size", "dropout")
             and (cfg.init_from != "resume" or ckpt["config"].get(k) == getattr(cfg, k))}
    changed = [f"{k}={v!r} (not {getattr(cfg, k)!r})" for k, v in shape.items() if getattr(cfg, k) != v]
    if changed:
        say("the model shape is the checkpoint's: " + ", ".join(changed))
    return ckpt, shape


def check_resume(cfg, model_args, tok, say, ckpt):
    """Check the checkpoint from load_start_checkpoint against this run: the same tokenizer and model shape;
    resuming, changed training settings are listed. A new run (from scratch or fine-tuning) needs an out_dir
    that holds no run. Raises UserError for an out_dir that already holds a run, or a checkpoint that does not
    fit."""
    existing = [f for f in ("ckpt.pt", "best_model_params.pt") if os.path.exists(os.path.join(cfg.out_dir, f))]
    if cfg.init_from != "resume" and existing == ["best_model_params.pt"] and died_before_checkpoint(cfg.out_dir):
        say(f"{cfg.out_dir} holds only the iteration-0 weights of a run that stopped before its first checkpoint: "
            f"starting again")
        existing = []
    if cfg.init_from != "resume" and existing:
        raise UserError(f"{cfg.out_dir} already holds a run ({', '.join(existing)}): continue it with "
                        f"--init_from=resume, or start a new one with another --out_dir (or delete {cfg.out_dir})")
    if ckpt is None:
        return
    resume = cfg.init_from == "resume"
    verb, path = ("resume", os.path.join(cfg.out_dir, "ckpt.pt")) if resume else ("fine-tune", cfg.init_from)
    if ckpt["tokenizer"]["sha256"] != tok.spec["sha256"]:
        fix = ("resume with the data it was trained on" if resume else f"prepare your text with its tokenizer, "
               f"`python prepare.py --tokenizer={path} --dataset=YOUR_TEXT --data_dir=DIR`, and pass --data_dir=DIR")
        raise UserError(f"cannot {verb}: {path} was trained with another tokenizer "
                        f"({tokenizer_label(ckpt['tokenizer'])}) than the data in {cfg.data_dir} "
                        f"({tokenizer_label(tok.spec)}); {fix}")
    saved = {**asdict(GPTConfig()), **ckpt["model_args"]}  # a checkpoint older than a switch has its default
    changed = {k: (saved[k], v) for k, v in model_args.items() if k != "dropout" and saved[k] != v}
    if changed:
        raise UserError(f"cannot {verb}: the model shape or recipe differs from the checkpoint's ("
                        + ", ".join(f"{k}: {a} there, {b} here" for k, (a, b) in changed.items())
                        + "); use the same settings or a new out_dir")
    was = ckpt["config"].get("optimizer", "adamw")
    if resume and was != cfg.optimizer:
        raise UserError(f"cannot resume: {path} was trained with optimizer={was!r}, not {cfg.optimizer!r}, and its "
                        f"optimizer state only fits that one; resume with --optimizer={was} or use a new out_dir")
    if resume:
        changed = [f"{k} {ckpt['config'].get(k)!r} -> {v!r}" for k, v in vars(cfg).items()
                   if k != "init_from" and ckpt["config"].get(k) != v]
        if changed:
            say("settings changed since the checkpoint: " + ", ".join(changed))


def tokenizer_label(spec):
    """A tokenizer's name and the start of its fingerprint (the sha256 of its vocabulary), e.g. "bpe-4096
    (fingerprint 1a2b3c4d5e6f)": two vocabularies trained with the same settings on other text share the name."""
    return f"{spec.get('name')} (fingerprint {str(spec.get('sha256'))[:12]})"


def data_changed(ckpt, cfg, meta):
    """Whether a resumed run reads other data than its checkpoint was evaluated on: a validation split of another
    size (documents, tokens, bytes) than the one the checkpoint recorded, or, for a checkpoint that recorded none,
    another data_dir. Its best validation loss then measured other text and means nothing here."""
    if "validation" in ckpt:
        return ckpt["validation"] != meta["splits"]["validation"]
    return os.path.realpath(str(ckpt["config"].get("data_dir"))) != os.path.realpath(cfg.data_dir)


def died_before_checkpoint(out_dir):
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

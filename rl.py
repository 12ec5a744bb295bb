"""Reinforcement learning for stories on request: train an instructed model on a reward a program can check.

    python rl.py config/tinystories_1m_rl.py --init_from=out-1m-instruct/best_model_params.pt \\
                 --instructions=data/tinystories-json/data00.json
    python rl.py config/tinystories_1m_rl.py --init_from=resume     # continue a stopped run in the same out_dir

Instruction tuning (train.py on data prepared with --instruct, docs/instruct.md) teaches a model to use the words a
header asks for, but the weight that makes it use them also makes it stuff them in. Whether a story uses its
words, uses them as TinyStories' own stories do, ends, and does not loop can be checked by a program
(instruct.reward), so the model can be trained on that check directly.

Each iteration takes batch_size instructions of the --instructions file and, for each, samples group_size stories
with the model's own sampler (GPT.generate at `temperature` and `top_p`, sample.py's defaults, so that the stories
trained on are the ones a user gets), scores each with instruct.reward, and takes one policy-gradient step. It is
GRPO (Shao et al. 2024, "DeepSeekMath") in its on-policy form, as in nanochat's chat_rl: one step per batch of
stories, so there is no probability ratio to clip, and the mean of the story's group (the other stories for the
same instruction) as the baseline, which needs no learned value function and is not divided by the group's spread
(Liu et al. 2025, "Understanding R1-Zero-Like Training"). One change: each token is credited with the reward
earned from that token on (the reward-to-go of REINFORCE, Williams 1992), not the whole story's, and its baseline is
the same quantity averaged over the group's other stories at the same position (`advantages`):

    A(story, t) = reward earned at tokens >= t  -  mean over the other stories of the group of the same
    loss = sum over story tokens of [-A * log p(token) + kl_coef * KL(p || p_start)] / (story tokens in the batch)

instruct.reward_events says where each part is earned: a required word's first use at its first letter, each use
beyond the second at its own, the ending and the loop at the end. With one reward for the whole story, the first
use of a word and its fifth get the same credit; per token, the fifth use is the one charged with its cost
(docs/instruct.md measures both).

The story tokens include the <|endoftext|> that ends a story: ending is a choice the reward scores.
KL(p || p_start) is computed exactly over the vocabulary at every story token, against the model the run started
from (kept in ckpt.pt), and keeps the stories close to what instruction tuning taught: without it the reward alone
is met by text that is no longer a story. Probabilities are the sampler's at its temperature (the nucleus cut is
left out of the gradient), from the same windows it used (`story_logits`), and the model stays in eval mode (no
dropout), so the stories are the policy's own.

The last eval_rows rows of the --instructions file are held out: every eval_interval iterations the model writes
one story for each (the same seed each time) and their mean reward picks best_model_params.pt, as the validation
loss does in train.py. Files in out_dir: ckpt.pt (resume with --init_from=resume: the same stories and steps as
an uninterrupted run), best_model_params.pt (sample.py, eval.py, serve.py and export.py read it as any model),
log.csv (per iteration: the reward, its parts, the KL; held-out rewards at evaluations) and rl.png (its plot).
Ctrl-C finishes the iteration and saves.
"""

import copy
import csv
import io
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import plumbing
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from configurator import UserError, autocast, check_values, configure, resolve_device, run
from eval import instructed_stories, read_instructions
from files import append_line, lock_dir, write_text_atomic
from instruct import REWARD_PARTS, header, reward_events, summarize
from model import SAMPLING_DEFAULTS, check_sampling
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# I/O
out_dir = "out-rl"              # ckpt.pt, best_model_params.pt, log.csv and rl.png
init_from = ""                  # an instructed model (train.py's best_model_params.pt), or "resume" (out_dir/ckpt.pt)
instructions = ""               # a JSON file of instructions in TinyStories' archive layout (eval.py --instruct's)
eval_rows = 64                  # the file's last rows, held out: their mean reward picks best_model_params.pt
eval_interval = 25              # iterations between evaluations and checkpoints
# the stories
batch_size = 4                  # instructions per iteration
group_size = 8                  # stories per instruction; each is scored against the mean of its group
max_new_tokens = SAMPLING_DEFAULTS["max_new_tokens"]  # tokens per story at most; a story cut there has not ended
temperature = SAMPLING_DEFAULTS["temperature"]  # the sampler's (sample.py's): what is trained is the model as
top_p = SAMPLING_DEFAULTS["top_p"]  # sampled with this temperature and nucleus, the stories users will get
# the update
learning_rate = 5e-4            # AdamW's, after warmup_iters of linear warmup; constant after that
warmup_iters = 5                # iterations of linear warmup
max_iters = 200                 # policy-gradient steps in total
kl_coef = 0.05                  # weight of KL(model || starting model) per story token, in nats
weight_decay = 0.0              # decoupled weight decay (none: the starting weights are already regularised)
beta1 = 0.9                     # AdamW's momentum
beta2 = 0.95                    # AdamW's decay of the squared gradients
grad_clip = 1.0                 # clip the gradient's global norm to this; 0 turns clipping off
# system
device = "auto"                 # auto, cpu, mps, cuda, cuda:N
dtype = "auto"                  # auto, float32, bfloat16, float16 (autocast precision)
seed = 1337                     # seeds the instructions and the stories of each iteration, and the evaluations
# -----------------------------------------------------------------------------

MAX_NONFINITE_STEPS = 8  # iterations in a row with a non-finite loss or gradient before the run stops
LOG_COLUMNS = ["iter", *REWARD_PARTS, "kl", "story_tokens", *(f"eval_{k}" for k in REWARD_PARTS), "eval_word_share",
               "eval_uses_per_used_word", "lr", "elapsed_s"]


def story_logits(model, idx, prompt_len, keep):
    """The logits GPT.generate_stream computed for each token it added to a prompt, from the same windows.

    A story longer than the context was written through sliding windows (the first `keep` tokens, the header,
    then the latest ones: see generate_stream); each token's probability must be taken in the window it was drawn
    in, so this follows the same schedule and runs one forward pass per window.

    Args:
        model: the GPT (its block_size); idx: (B, prompt_len + n) int64, prompts (all prompt_len tokens long) and
        the n tokens generate added; keep: generate's `keep` (ignored unless 0 < keep < block_size // 2, as there).
    Returns:
        (B, n, vocab_size) logits: row t predicts idx[:, prompt_len + t]. Gradients flow when they are on.
    """
    block = model.config.block_size
    keep = keep if 0 < keep < block // 2 else 0
    tail = max(keep, prompt_len - (block - keep))
    out, pos, end = [], prompt_len, idx.size(1)
    while pos < end:
        if keep + pos - tail > block:
            tail = pos - (block // 2 - keep)
        last = min(end, tail + block - keep + 1)  # this window serves positions pos..last-1, then it slides
        window = torch.cat([idx[:, :keep], idx[:, tail:last - 1]], dim=1)
        targets = torch.zeros_like(window)  # any targets: the model then returns every position's logits
        logits, _ = model(window, targets)
        out.append(logits[:, keep + pos - tail - 1:])
        pos = last
    return torch.cat(out, dim=1)


def story_mask(new, eot_token):
    """(B, n) bool: which of the generated tokens `new` (B, n) belong to the story: up to and including its
    first eot_token (generate repeats eot_token after it)."""
    eot = new == eot_token
    return (eot.cumsum(dim=1) - eot.long()) == 0


def write_stories(model, tok, rows, generator, ctx):
    """group_size stories for each instruction of `rows`, with the model's own sampler (instructions whose headers
    are as long in tokens are sampled as one batch). Returns a list of (prompt_len, idx, row_of) per header length:
    idx (k * group_size, prompt_len + n) int64, the headers and the tokens generate added; row_of, the index in
    `rows` of each row of idx."""
    encoded = tok.encode_batch([header(r["words"], r["features"], r["summary"]) for r in rows])
    batches = []
    for length in sorted({len(ids) for ids in encoded}):
        row_of = [i for i, ids in enumerate(encoded) if len(ids) == length for _ in range(group_size)]
        idx = torch.tensor([encoded[i] for i in row_of], dtype=torch.long, device=generator.device)
        with ctx:
            idx = model.generate(idx, max_new_tokens, temperature=temperature, top_p=top_p, eos_token=tok.eot_token,
                                 vocab_limit=tok.vocab_size, generator=generator, keep=length)
        batches.append((length, idx, row_of))
    return batches


def token_rewards(tok, story, events):
    """Each reward event (instruct.reward_events: character offset in the story's text, value) put on the token
    that wrote the character there; events at the end of the text go to the story's last token (its
    <|endoftext|> when it ended). story: the story's token ids, up to and including <|endoftext|> if it has one.
    Returns a list of len(story) floats. Offsets are exact when every token decodes to whole characters (as
    TinyStories' text does); a character split across tokens goes to its last token."""
    ends = np.cumsum([len(tok.decode([t])) for t in story if t != tok.eot_token])
    out = [0.0] * len(story)
    for at, value in events:
        out[min(int(np.searchsorted(ends, at, side="right")), len(story) - 1)] += value
    return out


def advantages(rewards, groups):
    """The advantage of every story token: the reward earned from that token on (reward-to-go: what a token
    decides cannot change what came before it), minus the mean of the same over the other stories of its group at
    the same position (the group's baseline, leaving the story itself out so that it stays independent of it).

    Args:
        rewards: (B, n) float, each story's token_rewards (0 beyond its end); groups: (B,) int, the instruction of
        each story (stories of one instruction share its header, so their positions line up).
    Returns:
        (B, n) float. At the first token the baseline is the group's mean reward, as in GRPO; a story's later
        tokens are credited only with what they earned, so a required word's first use is credited with its
        use and the fifth with its overuse, not the other way round.
    """
    to_go = rewards.flip(1).cumsum(dim=1).flip(1)
    same = (groups[:, None] == groups[None, :]).float()
    others = same.sum(dim=1, keepdim=True) - 1
    baseline = (same @ to_go - to_go) / others.clamp(min=1)
    return to_go - baseline


def policy_step(model, start_model, tok, rows, batches, ctx):
    """Score the stories of write_stories and add the gradient of the loss (this module's docstring) to the
    model's. Returns ({reward part: mean over stories}, KL in nats per story token, mean story tokens, loss as a
    0-d tensor)."""
    V = tok.vocab_size  # the padded ids are never sampled: they are not part of the policy
    scored, everything = [], []  # per batch: the story mask and the token rewards; every story's reward parts
    for length, idx, row_of in batches:
        mask = story_mask(idx[:, length:], tok.eot_token)
        rewards = torch.zeros(mask.shape)
        for b, (r, new, n) in enumerate(zip(row_of, idx[:, length:].tolist(), mask.sum(dim=1).tolist())):
            ended = tok.eot_token in new
            parts, events = reward_events(rows[r]["words"], tok.decode(new[:n - ended]), ended)
            rewards[b, :n] = torch.tensor(token_rewards(tok, new[:n], events))
            everything.append(parts)
        scored.append((mask, advantages(rewards, torch.tensor(row_of))))
    tokens = sum(int(mask.sum()) for mask, _ in scored)
    loss_sum, kl_sum = torch.zeros(()), torch.zeros(())
    for (length, idx, row_of), (mask, advantage) in zip(batches, scored):
        with ctx:
            logits = story_logits(model, idx, length, length)[..., :V].float() / temperature
            with torch.no_grad():
                start_logits = story_logits(start_model, idx, length, length)[..., :V].float() / temperature
        # each story token's log-probability at the sampler's temperature (the nucleus cut is left out of the
        # gradient: cutting each of the B x n positions would take a sort of the vocabulary, more time than the
        # rest of the step, for the 1 - top_p of the mass it leaves out), and the KL to the starting model
        logp = F.log_softmax(logits, dim=-1)
        token_logp = logp.gather(-1, idx[:, length:, None])[..., 0]
        kl = (logp.exp() * (logp - F.log_softmax(start_logits, dim=-1))).sum(dim=-1)
        mask = mask.float()
        loss = ((-advantage.to(idx.device) * token_logp + kl_coef * kl) * mask).sum() / tokens
        loss.backward()
        loss_sum += loss.detach().cpu()
        kl_sum += (kl.detach() * mask).sum().cpu()
    means = {k: float(np.mean([p[k] for p in everything])) for k in REWARD_PARTS}
    return means, float(kl_sum) / tokens, tokens / len(everything), loss_sum


def get_lr(it):
    """learning_rate after a linear warmup over warmup_iters iterations (Goyal et al. 2017); constant after."""
    return learning_rate * min(1.0, (it + 1) / (warmup_iters + 1))


def evaluate(model, tok, rows, device, ctx):
    """One story per held-out instruction (eval.instructed_stories: the same seed every time, so that evaluations
    compare), scored. Returns instruct.summarize's dict (reward parts under "reward")."""
    _, scores = instructed_stories(model, tok, rows, device, ctx, seed, max_new_tokens, temperature, 0, top_p)
    return summarize(scores)


def check_settings():
    """Raise UserError for settings that cannot work, before anything is read or written."""
    if not init_from:
        raise UserError("give the instructed model to start from: --init_from=OUT_DIR/best_model_params.pt (a model "
                        "trained on data prepared with --instruct, docs/instruct.md), or --init_from=resume")
    if not instructions:
        raise UserError("give the instructions to write for: --instructions=FILE.json (TinyStories' archive layout, "
                        "the files eval.py --instruct takes)")
    if group_size < 2:
        raise UserError(f"group_size={group_size}: a story is scored against the other stories of its group, so a "
                        f"group of one learns nothing (its advantage is always 0); use 2 or more (8)")
    if not temperature > 0:
        raise UserError(f"temperature={temperature}: the stories of a group must differ for any of them to be better "
                        f"than the others; use a temperature above 0 ({SAMPLING_DEFAULTS['temperature']})")
    check_sampling(temperature, 0, top_p, max_new_tokens)
    check_values(globals(), {**dict.fromkeys(("batch_size", "eval_rows", "eval_interval"), "count"),
                             **dict.fromkeys(("max_iters", "warmup_iters"), "count0"), "learning_rate": "rate",
                             **dict.fromkeys(("kl_coef", "weight_decay", "grad_clip"), "rate0"),
                             **dict.fromkeys(("beta1", "beta2"), "fraction"), "seed": "seed"})


def load_start():
    """The checkpoint the run starts from: out_dir/ckpt.pt of an rl.py run to resume, or an instructed model.
    Raises UserError: a missing or unreadable checkpoint, a model not trained with instructions, a train.py
    ckpt.pt to resume, or (for a new run) an out_dir that already holds a run."""
    if init_from == "resume":
        path = os.path.join(out_dir, "ckpt.pt")
        ckpt = load_checkpoint(path)
        if "rl" not in ckpt:
            raise UserError(f"{path} was written by train.py, not rl.py: to improve that model with rl.py, start a "
                            f"new run from it, --init_from={os.path.join(out_dir, 'best_model_params.pt')} "
                            f"--out_dir=ANOTHER_DIR")
        return ckpt
    existing = [f for f in ("ckpt.pt", "best_model_params.pt") if os.path.exists(os.path.join(out_dir, f))]
    if existing:
        raise UserError(f"{out_dir} already holds a run ({', '.join(existing)}): continue it with "
                        f"--init_from=resume, or start a new one with another --out_dir")
    ckpt = load_checkpoint(init_from)
    if not ckpt.get("instruct"):
        raise UserError(f"{init_from} was not trained with instructions (its data was prepared without --instruct), "
                        f"so it does not know what a header asks for; train one first (docs/instruct.md: "
                        f"python train.py config/tinystories_1m_modern.py config/tinystories_1m_instruct.py)")
    return ckpt


def check_instructions(rows, tok, block_size):
    """Split the --instructions rows into (training rows, held-out rows), checking that they fit the model.
    Raises UserError: too few rows, no required word anywhere, or a header too long to stay in the model's
    context (the row named)."""
    if len(rows) <= eval_rows:
        raise UserError(f"{instructions} has {len(rows)} rows: eval_rows={eval_rows} of them are held out, so none "
                        f"is left to train on; lower --eval_rows or use a larger file")
    if not any(r["words"] for r in rows):
        raise UserError(f"{instructions}: no row asks for any word (instruction.words), so there is nothing to "
                        f"reward; use a file in TinyStories' archive layout (data00.json ...)")
    lengths = [len(ids) for ids in tok.encode_batch([header(r["words"], r["features"], r["summary"]) for r in rows])]
    too_long = [i for i, n in enumerate(lengths) if n >= block_size // 2]
    if too_long:
        i = too_long[0]
        raise UserError(f"{instructions}, row {i}: its header is {lengths[i]} tokens with this model's tokenizer "
                        f"({tok.spec['name']}); a header must stay in every window of the model's {block_size}-token "
                        f"context, so at most {block_size // 2 - 1}; shorten or remove that row ({len(too_long)} "
                        f"rows are too long)")
    return rows[:-eval_rows], rows[-eval_rows:]


def start_log(path, iter_num, resume):
    """log.csv with its header, or, resuming, its rows before iter_num (the resumed run writes iter_num's again;
    rewritten whole, never through a link)."""
    rows = []
    if resume and os.path.isfile(path):
        with open(path, newline="") as f:
            rows = [r for r in list(csv.reader(f))[1:] if r and r[0].isdigit() and int(r[0]) < iter_num]
    lines = io.StringIO()
    csv.writer(lines).writerows([LOG_COLUMNS, *rows])
    write_text_atomic(lines.getvalue(), path)


def append_log(path, row):
    """Append one row (a dict over LOG_COLUMNS; missing values are left blank) to log.csv, never through a link.
    Raises UserError if it cannot be written."""
    line = io.StringIO()
    csv.writer(line).writerow(["" if row.get(k) is None else
                               (row[k] if isinstance(row[k], int) else f"{row[k]:.5g}") for k in LOG_COLUMNS])
    try:
        append_line(path, line.getvalue())
    except OSError as e:
        raise UserError(f"could not append to {path}: {e.strerror or e}; the checkpoints are intact: fix it, then "
                        f"continue with --init_from=resume") from None


def plot_log(log_path, png_path):
    """Plot log.csv: the reward per iteration (and on the held-out instructions), its parts, and the KL."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(log_path) as f:
        rows = list(csv.DictReader(f))

    def series(key):
        pairs = [(int(r["iter"]), float(r[key])) for r in rows if r.get(key)]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(*series("reward"), label="stories of the iteration", alpha=0.6)
    axes[0].plot(*series("eval_reward"), "o-", label="held-out instructions")
    axes[0].set_ylabel("reward")
    for k in REWARD_PARTS[1:]:
        axes[1].plot(*series(k), label=k)
    axes[1].set_ylabel("reward parts (mean)")
    axes[2].plot(*series("kl"), label="KL(model || start)")
    axes[2].set_ylabel("nats per story token")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.legend()
        ax.grid(alpha=0.3)
    plumbing.save_figure(fig, png_path)


def main():
    config = configure(globals(), doc=__doc__)
    check_settings()
    dev, device_type, precision = resolve_device(device, dtype)
    ctx = autocast(device_type, precision)
    resume = init_from == "resume"
    ckpt = load_start()
    tok = Tokenizer(ckpt["tokenizer"])
    train_rows, eval_rows_list = check_instructions(read_instructions(instructions, None), tok,
                                                    ckpt["model_args"]["block_size"])
    lock_dir(out_dir, "rl.py")  # one run per out_dir: a second one stops here
    print(f"{len(train_rows)} instructions to train on, {len(eval_rows_list)} held out; "
          f"{batch_size} x {group_size} stories per iteration; device {dev}, dtype {precision}")

    # the model, the frozen model it started from (the KL's reference), and the optimizer
    model = model_from_checkpoint(ckpt).to(dev).eval()  # eval: no dropout, so the stories are the policy's own
    start_model = copy.deepcopy(model).requires_grad_(False)
    if resume:
        start_model.load_state_dict(ckpt["start_model"])
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(beta1, beta2), weight_decay=weight_decay)
    iter_num, best_reward, elapsed = 0, -math.inf, 0.0
    if resume:
        opt.load_state_dict(ckpt["optimizer"])
        iter_num, best_reward, elapsed = ckpt["iter_num"], ckpt["best_reward"], ckpt["elapsed_s"]
        print(f"resuming from iteration {iter_num} (best held-out reward {best_reward:.4f})")
        changed = [f"{k} {ckpt['rl'].get(k)!r} -> {v!r}" for k, v in config.items()
                   if k != "init_from" and ckpt["rl"].get(k) != v]
        if changed:
            print("settings changed since the checkpoint: " + ", ".join(changed))
    # what every checkpoint of the run keeps of the model it started from; "config" stays the instructed model's
    # training settings (eval.py finds its data there), and "rl" holds this run's
    model_args, tokenizer_spec, train_config = ckpt["model_args"], ckpt["tokenizer"], ckpt["config"]
    kept = {"validation": ckpt["validation"]} if "validation" in ckpt else {}  # the size of its validation split
    ckpt = None  # its memory

    def save(name, **extra):
        save_checkpoint(os.path.join(out_dir, name), model, model_args, tokenizer_spec, train_config, True, iter_num,
                        rl=config, **kept, **extra)

    def save_run():
        save("ckpt.pt", optimizer=opt.state_dict(), start_model=start_model.state_dict(), best_reward=best_reward,
             elapsed_s=time.time() - t_start)

    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "log.csv")
    start_log(log_path, iter_num, resume)
    guard = plumbing.StepGuard(MAX_NONFINITE_STEPS, out_dir)
    t_start = time.time() - elapsed
    bar = tqdm(total=max_iters, initial=iter_num, desc="rl", unit="iter", dynamic_ncols=True,
               disable=not sys.stderr.isatty())  # on a terminal only; the evaluations are printed anyway
    while True:
        row = {"iter": iter_num}
        # (a resumed run evaluates its first iteration again: the same weights and seed give the same stories)
        if iter_num % eval_interval == 0 or iter_num == max_iters:
            held_out = evaluate(model, tok, eval_rows_list, dev, ctx)
            row.update({f"eval_{k}": v for k, v in held_out["reward"].items()})
            row.update(eval_word_share=held_out["word_share"], eval_uses_per_used_word=held_out["uses_per_used_word"])
            uses = held_out["uses_per_used_word"]
            tqdm.write(f"iter {iter_num}: held-out reward {held_out['reward']['reward']:.4f}, words used "
                      f"{100 * held_out['word_share']:.1f}%, uses per used word "
                      f"{'-' if uses is None else f'{uses:.2f}'}, ending {held_out['reward']['ending']:.2f}, "
                      f"loop {held_out['reward']['loop']:.3f}")
            if held_out["reward"]["reward"] > best_reward:
                best_reward = held_out["reward"]["reward"]
                save("best_model_params.pt", reward=best_reward)
            if iter_num > 0:
                save_run()
        if iter_num >= max_iters or guard.stopping:
            if len(row) > 1:
                append_log(log_path, {**row, "elapsed_s": time.time() - t_start})
            break

        # the instructions and the stories of this iteration: a function of (seed, iter_num), so a resumed run
        # writes exactly the stories the uninterrupted one would have
        lr = get_lr(iter_num)
        for group in opt.param_groups:
            group["lr"] = lr
        pick = np.random.default_rng(plumbing.batch_seed(seed, "instructions", iter_num))
        rows = [train_rows[i] for i in pick.choice(len(train_rows), batch_size, replace=len(train_rows) < batch_size)]
        generator = torch.Generator(device=dev).manual_seed(plumbing.batch_seed(seed, "stories", iter_num))
        batches = write_stories(model, tok, rows, generator, ctx)
        means, kl, story_tokens, loss = policy_step(model, start_model, tok, rows, batches, ctx)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
        if guard.step_is_sound(iter_num, loss, grad_norm):
            opt.step()
        opt.zero_grad(set_to_none=True)
        row.update(means, kl=kl, story_tokens=story_tokens, lr=lr, elapsed_s=time.time() - t_start)
        append_log(log_path, row)
        iter_num += 1
        bar.update(1)
        bar.set_postfix(reward=f"{means['reward']:.3f}", words=f"{means['words']:.2f}", kl=f"{kl:.4f}")
    bar.close()
    if iter_num < max_iters:
        save_run()
        print(f"stopped at iteration {iter_num}; saved {out_dir}/ckpt.pt. Continue with:\n  "
              f"{plumbing.resume_command()}")
        return
    plot_log(log_path, os.path.join(out_dir, "rl.png"))
    print(f"done: best held-out reward {best_reward:.4f} (best_model_params.pt); stories: python sample.py "
          f"--out_dir={out_dir} --words=dog,ball,happy --start=\"\"; measure: python eval.py --out_dir={out_dir} "
          f"--instruct={instructions}")


if __name__ == "__main__":
    run(main)

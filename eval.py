"""Evaluate a trained model: exact validation loss, the quality of its stories, and optionally a judge's grades.

    python eval.py --out_dir=out                              # validation.bin of the data it was trained on
    python eval.py --out_dir=out --text=my_stories.txt        # any UTF-8 text file instead
    python eval.py --out_dir=out --judge_url=http://localhost:8000/v1 --judge_model=NAME
    python eval.py --compare=out-a/eval.json,out-b/eval.json  # saved reports side by side (no model)
    python eval.py --out_dir=out --instruct=validation.json --num_samples=100  # stories on request (instruct.py)

Writes the report as JSON (--report, default out_dir/eval.json) and a short Markdown summary beside it (eval.md).

1. Exact loss. Every token of the stream is scored exactly once: the stream is cut into windows of block_size
   tokens, each starting block_size - overlap tokens after the previous one. The first window scores all its
   tokens; every later window scores only its last block_size - overlap, so each is predicted from at least
   overlap + 1 tokens of context. The first token of the stream has nothing before it and is not predicted:
   N tokens give N - 1 predictions. Reported: loss in nats/token (sum of the per-token negative log-likelihoods
   over their number, summed in float64), perplexity exp(loss), and bits per byte = loss / ln 2 x tokens / bytes,
   where tokens and bytes are those of the whole split in meta.json: tokens counts every document's tokens plus
   its <|endoftext|>, bytes the UTF-8 bytes of the documents' text (no separators). The end-of-text predictions
   are thus charged to the text, as in train.py's bpb. With --text, the file is split into documents by
   prepare.py's own reader (prepare.text_documents: on lines holding only <|endoftext|> where it has them, else
   on blank lines), each followed by <|endoftext|>, and encoded as prepare.py encodes them; bytes are the UTF-8
   bytes of those documents. So the same text scores the same as its prepared validation.bin, and bits per byte
   compare across tokenizers. The softmax is the model's own (as in train.py's loss), over all
   vocab_size ids including the padding ids that no text contains.
2. Stories: num_samples continuations of built-in TinyStories-style openings (cycled), sampled with the given
   temperature / top_k / top_p and seed (same seed, same stories on the same device). Metrics are on the
   generated text only (the prompt excluded). A word is a maximal run of letters, with apostrophes allowed
   inside (don't, Lily's), lowercased; digits and punctuation separate words. Reported: mean length in tokens
   (before <|endoftext|>) and in words; the share of samples that produced <|endoftext|> within max_new_tokens;
   distinct-1/2/3 (Li et al. 2016: distinct word n-grams / all word n-grams, pooled over the samples, n-grams
   never crossing samples); the longest word n-gram that occurs twice in a sample (occurrences may overlap),
   averaged over samples; and the share of generated words not in the train split's word list, built by
   decoding up to vocab_tokens tokens of train.bin (whole documents from evenly spaced pieces; 0: all).
   With --instruct=FILE (a JSON file in TinyStories' archive layout), the stories are instead one per row of
   the file (the first num_samples rows), each written after instruct.header of the row's words, features and
   summary, as prepare.py --instruct trains; the report adds the share of required words the stories use
   (instruct.uses: any inflection, whole words, any case) and, per feature checkable from the text (Dialogue:
   quoted speech), how often it shows when asked and when not, with a table of every story.
3. Judge (off by default): an OpenAI-compatible chat-completions server grades each story for grammar,
   creativity, consistency and plot, 1 to 10, as in the TinyStories paper (Eldan & Li 2023). It is asked for a
   JSON object; answers that cannot be parsed are counted and skipped, and the run fails only if none parse.
   The API key is read from the environment variable named by judge_key_env (none is sent if it is unset).
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

from checkpoint import load_model, quantize_int8
from fast import speed_up
from configurator import UserError, autocast, check_values, configure, resolve_device, read_text, run
from files import GiB, MiB, check_input_file, write_text_atomic
from instruct import (CHECKABLE, ENDING_WEIGHT, REWARD_PARTS, WORDS_WEIGHT, header, load_instructions, longest_repeat,
                      score, summarize, words)
from judge import CRITERIA, judge_samples
from model import SAMPLING_DEFAULTS, check_sampling
from prepare import read_meta, text_documents as prepared_documents
from tokenizer import bits_per_byte, tokenizer_from_meta

# -----------------------------------------------------------------------------
out_dir = "out"                         # directory that holds the checkpoint
checkpoint = "best_model_params.pt"     # file name inside out_dir
data_dir = ""                           # prepared data; "" : the data_dir the checkpoint was trained on
text = ""                               # a UTF-8 text file to score instead of validation.bin
report = ""                             # JSON report path; "" : out_dir/eval.json (eval.md beside it)
compare = ""                            # "a.json,b.json,...": print saved reports side by side and exit
# exact loss
block_size = 0                          # window length in tokens; 0: the model's block_size
overlap = -1                            # context tokens shared with the previous window; -1: block_size // 2
batch_size = 8                          # windows per forward pass
max_tokens = 0                          # score only the first max_tokens tokens of the stream (0: all)
# stories
num_samples = 20                        # 0 skips the story metrics (and the judge)
max_new_tokens = SAMPLING_DEFAULTS["max_new_tokens"]  # tokens per story at most
temperature = SAMPLING_DEFAULTS["temperature"]  # < 1 sharper, > 1 more random, 0 greedy
top_k = SAMPLING_DEFAULTS["top_k"]  # sample among the k most likely tokens (0: all)
top_p = SAMPLING_DEFAULTS["top_p"]  # nucleus sampling (1.0: all)
seed = 1337
instruct = ""                           # JSON file of instructions (archive layout): one story per row, scored
vocab_tokens = 5_000_000                # train.bin tokens decoded for the word list (0: all)
# judge
judge_url = ""                          # e.g. http://localhost:8000/v1 or https://api.openai.com/v1 ("": no judge)
judge_model = ""                        # the model name the server expects
judge_key_env = "OPENAI_API_KEY"        # environment variable holding the API key (unset: no key is sent)
judge_timeout = 120.0                   # seconds to wait for each answer
judge_temperature = 0.0                 # sent with each request; negative: not sent (for models that refuse it)
# system
device = "auto"                         # auto, cpu, mps, cuda, cuda:N
dtype = "auto"                          # auto, float32, bfloat16, float16
quantize = ""                           # "int8": evaluate sample.py --quantize=int8's model (CPU, float32)
# -----------------------------------------------------------------------------

_REPORT_KIND = "tinystories-eval"
# The largest files that make sense here, in bytes (files.check_input_file refuses larger ones before reading):
TEXT_LIMIT = 1 * GiB  # --text: held in memory with its tokens (TinyStoriesV2's validation file is 22 MB)
INSTRUCT_LIMIT = 1 * GiB  # --instruct: parsed whole (each file of TinyStories' archive is a few hundred MB)
REPORT_LIMIT = 256 * MiB  # a report of eval.py (--compare, or the --report it would replace): stories and numbers

# Openings in the style of TinyStories, each stopping mid-sentence so the model has to continue it.
PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to",
    "One day, a small dog named Max found a",
    "Tom and his mom went to the park. Tom saw a big",
    "Once upon a time, in a big forest, there lived a",
    "Sara had a red ball. She played with it every day. One day, the ball",
    "The sun was shining and the birds were singing. Ben wanted to",
    "Once upon a time, there was a kind old man who had a",
    "Lucy and her friend Tim were building a sandcastle at the beach when",
    "Mia was sad because she lost her favorite toy. She looked",
    "There was a little bird who could not fly. Every day, the bird",
]


# --------------------------------------------------------------------------------------------------------------
# 1. Exact loss

def window_starts(n_tokens, block_size, overlap):
    """Start of each scoring window over a stream of n_tokens tokens (see exact_loss). Returns a list of ints."""
    stride = block_size - overlap
    extra = max(0, n_tokens - 1 - block_size)  # predictions beyond what the first window holds
    return [k * stride for k in range(1 + -(-extra // stride))]


@torch.no_grad()
def check_window(model_block, block_size=None, overlap=None):
    """The scoring window of exact_loss: (block_size, overlap) in tokens, None meaning the model's block_size and
    half the window. Raises UserError (a ValueError) unless 1 <= block_size <= model_block and
    0 <= overlap < block_size."""
    block_size = model_block if block_size is None else block_size
    overlap = block_size // 2 if overlap is None else overlap
    if not 1 <= block_size <= model_block:
        raise UserError(f"block_size={block_size} must be 1..{model_block} (the model's context)")
    if not 0 <= overlap < block_size:
        raise UserError(f"overlap={overlap} must be 0..{block_size - 1} (less than block_size={block_size})")
    return block_size, overlap


def exact_loss(model, tokens, block_size=None, overlap=None, batch_size=8, device="cpu", ctx=None,
               progress=None):
    """Score every token of a stream exactly once with overlapping windows.

    Window k starts at token k * (block_size - overlap) and feeds up to block_size tokens. Window 0 scores all
    its predictions; window k > 0 only those of its last block_size - overlap positions, so every token after
    the first is predicted once, from at least overlap + 1 tokens of context (from all tokens before it while
    the stream fits in one window). The last window is shorter when the stream ends inside it.

    Args:
        model: a GPT (a torch.compile'd or DistributedDataParallel one is unwrapped: batch shapes vary). Put
            in eval mode for the call, and back in training mode afterwards if it was.
        tokens: 1-D array of token ids, N >= 2 (np.ndarray, np.memmap, list); read one window at a time, so a
            memmap is never copied whole.
        block_size: tokens per window, at most the model's; None: the model's block_size.
        overlap: context tokens each window shares with the previous one, 0 <= overlap < block_size; None:
            block_size // 2. Larger is more accurate and slower (N / (block_size - overlap) windows).
        batch_size: windows per forward pass; the result does not depend on it beyond float rounding.
        device: where the model is ("cpu", "cuda", ...). ctx: autocast context (None: none).
        progress: optional callable(windows_done, windows_total), called after each batch.
    Returns:
        dict with loss_sum (float, nats: the float64 sum of -log p(token | context)), tokens_scored (int,
        N - 1), loss (float, nats/token: loss_sum / tokens_scored), windows, block_size, overlap.
    Raises:
        ValueError: fewer than 2 tokens, block_size outside 1..model block_size, overlap outside
            0..block_size-1, or batch_size < 1.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile'd: the module itself (shapes vary here)
    model = getattr(model, "module", model)  # DistributedDataParallel: the module itself
    n = len(tokens)
    block_size, overlap = check_window(model.config.block_size, block_size, overlap)
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    ctx = nullcontext() if ctx is None else ctx
    starts = window_starts(n, block_size, overlap)
    was_training = model.training
    model.eval()
    loss_sum, scored = 0.0, 0
    try:
        for b0 in range(0, len(starts), batch_size):
            batch = starts[b0:b0 + batch_size]
            lengths = [min(block_size, n - 1 - s) for s in batch]
            width = max(lengths)
            x = np.zeros((len(batch), width), dtype=np.int64)  # padding after a short window: causal, harmless
            y = np.full((len(batch), width), -1, dtype=np.int64)  # -1: not scored
            for row, (s, length) in enumerate(zip(batch, lengths)):
                seg = np.asarray(tokens[s:s + length + 1], dtype=np.int64)
                first = 0 if s == 0 else overlap
                x[row, :length] = seg[:-1]
                y[row, first:length] = seg[1 + first:]
            count = int((y >= 0).sum())
            with ctx:  # the model's loss is the mean over the scored positions (-1 targets are ignored)
                _, loss = model(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
            loss_sum += loss.double().item() * count
            scored += count
            if progress is not None:
                progress(min(b0 + batch_size, len(starts)), len(starts))
    finally:
        model.train(was_training)
    assert scored == n - 1, f"scored {scored} predictions for {n} tokens"
    return {"loss_sum": loss_sum, "tokens_scored": scored, "loss": loss_sum / scored, "windows": len(starts),
            "block_size": block_size, "overlap": overlap}


def loss_summary(result, n_tokens, n_bytes):
    """The loss of an exact_loss result in the three units reported: dict with nats_per_token, perplexity
    (exp of it) and bits_per_byte (model.bits_per_byte with n_tokens and n_bytes, the token and UTF-8 byte counts
    of the whole text: meta.json's per split)."""
    loss = result["loss"]
    return {"nats_per_token": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": bits_per_byte(loss, n_tokens, n_bytes)}


def check_text_file(path):
    """Check the --text file before anything is loaded (files.check_input_file): a regular file of at most
    TEXT_LIMIT bytes. Raises UserError naming it otherwise (missing, a folder, a device, a FIFO, too large)."""
    check_input_file(path, "the --text file", TEXT_LIMIT, "score a part of it (head -c 100M FILE > part.txt)")


def text_documents(path):
    """The documents of a text file exactly as prepare.py reads a .txt (prepare.text_documents, the one owner of
    that rule; a leading byte-order mark is not text). Returns a list of str. Raises UserError: missing, not a
    regular file (a folder, /dev/zero, a FIFO), over TEXT_LIMIT bytes, unreadable, not UTF-8, or no text."""
    check_text_file(path)
    docs = list(prepared_documents(path))
    if not docs:
        raise UserError(f"the text file {path} holds no text, only <|endoftext|> lines and whitespace")
    return docs


def encode_documents(tok, docs):
    """Token stream of documents as prepare.py writes it: each document's tokens, then <|endoftext|>.
    Returns a 1-D int64 np.ndarray."""
    eot = np.array([tok.eot_token], dtype=np.int64)
    return np.concatenate([a for doc in tok.encode_batch(docs, dtype=np.int64) for a in (doc, eot)])


# --------------------------------------------------------------------------------------------------------------
# 2. Stories


def distinct_n(word_lists, n):
    """Distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models"):
    distinct word n-grams / all word n-grams, pooled over the lists (no n-gram crosses two lists).
    Returns a float in (0, 1], or None when there is no n-gram."""
    grams = [tuple(ws[i:i + n]) for ws in word_lists for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def text_metrics(texts, vocab=None):
    """Word-level metrics of generated texts (see `words`).

    Args:
        texts: list of str, one per sample. vocab: set of words seen in training, or None.
    Returns:
        dict: words (mean words per sample), distinct_1, distinct_2, distinct_3 (pooled; None without n-grams),
        longest_repeat (mean over samples of longest_repeat, in words), oov (share of all generated words not
        in vocab; None without vocab or without words).
    """
    lists = [words(t) for t in texts]
    total = sum(len(ws) for ws in lists)
    oov = None
    if vocab is not None and total:
        oov = sum(w not in vocab for ws in lists for w in ws) / total
    return {"words": total / len(lists) if lists else None,
            **{f"distinct_{n}": distinct_n(lists, n) for n in (1, 2, 3)},
            "longest_repeat": sum(map(longest_repeat, lists)) / len(lists) if lists else None,
            "oov": oov}


def train_vocabulary(path, meta, limit, pieces=16, step=1 << 20):
    """The set of words (see `words`) in the train split of prepared data, decoded with that data's tokenizer.

    Reads whole documents only, about `step` tokens at a time: all of train.bin when limit (tokens) is 0 or at least
    its size, else `pieces` evenly spaced slices of limit / pieces tokens each, every slice trimmed to the
    documents that start and end inside it.
    Returns (set of str, tokens decoded). Raises UserError if the data's tokenizer file is missing or changed."""
    tok = tokenizer_from_meta(meta, path)
    eot = tok.eot_token
    data = np.memmap(os.path.join(path, "train.bin"), dtype=np.dtype(meta["dtype"]), mode="r")
    n = len(data)
    if limit <= 0 or limit >= n:
        spans = [(0, n)]
    else:
        size = max(1, limit // pieces)
        spans = [(int(s), int(s) + size) for s in np.linspace(0, n - size, pieces)]
    vocab, read = set(), 0
    for lo, hi in spans:
        pos, partial = lo, lo > 0 and data[lo - 1] != eot  # partial: the slice starts inside a document
        while pos < hi:
            size = step
            while True:  # read on until a document ends (a document longer than step)
                chunk = np.asarray(data[pos:min(hi, pos + size)])
                ends = np.flatnonzero(chunk == eot)
                if len(ends) or pos + size >= hi:
                    break
                size *= 2
            if not len(ends):
                break  # the rest of the slice is one cut-off document
            last = int(ends[-1])
            begins = np.concatenate([[0], ends[:-1] + 1])
            if partial:
                begins, ends, partial = begins[1:], ends[1:], False
            docs = [tok.decode(chunk[a:b].tolist()) for a, b in zip(begins, ends)]
            vocab.update(words("\n".join(docs)))
            read += int((ends - begins + 1).sum())
            pos += last + 1
    return vocab, read


def continuations(out, prompt_len, eos_token):
    """The new tokens of each row of GPT.generate's output `out` (B, prompt_len + n) int64, cut before the first
    eos_token: a list of B (ids, ended), ids a list of int without eos_token, ended True if the row produced it."""
    rows = [row[prompt_len:] for row in out.tolist()]
    return [(new[:new.index(eos_token)], True) if eos_token in new else (new, False) for new in rows]


def generate_samples(model, tok, prompts, n, max_new_tokens, temperature, top_k, top_p, seed, device, ctx=None):
    """Sample n stories, sample i continuing prompts[i % len(prompts)]; the samples of one prompt are drawn
    as one batch, prompts in order, from one torch.Generator seeded with `seed` (reproducible on one device).

    Returns:
        list of n dicts: prompt, text (the generated continuation, decoded, without <|endoftext|>), tokens
        (its length in tokens), ended (True if the model produced <|endoftext|> within max_new_tokens).
    """
    ctx = nullcontext() if ctx is None else ctx
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    samples = [None] * n
    try:
        for p, prompt in enumerate(prompts[:n]):
            rows = list(range(p, n, len(prompts)))
            ids = tok.encode_prompt(prompt)
            idx = torch.tensor([ids] * len(rows), dtype=torch.long, device=device)
            with ctx:
                out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                     eos_token=tok.eot_token, vocab_limit=tok.vocab_size, generator=generator)
            for i, (new, ended) in zip(rows, continuations(out, len(ids), tok.eot_token)):
                samples[i] = {"prompt": prompt, "text": tok.decode(new), "tokens": len(new), "ended": ended}
    finally:
        model.train(was_training)
    return samples


def story_metrics(samples, vocab=None):
    """Metrics of samples from generate_samples: text_metrics, plus num_samples, tokens (mean per sample,
    before <|endoftext|>) and ended (share of samples that produced <|endoftext|>). Returns a dict."""
    n = len(samples)
    return {"num_samples": n, "tokens": sum(s["tokens"] for s in samples) / n,
            "ended": sum(s["ended"] for s in samples) / n, **text_metrics([s["text"] for s in samples], vocab)}


def read_instructions(path, n):
    """The first n rows' instructions of the --instruct file (instruct.load_instructions). Raises UserError: the
    file is unreadable or malformed (naming the row)."""
    try:
        rows = load_instructions(path, read_text(path, "the --instruct file", INSTRUCT_LIMIT,
                                                 "take the first rows into a smaller file"))
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise UserError(str(e)) from None
    return rows[:n]


def instructed_samples(model, tok, dev, ctx, ckpt):
    """One story per instruction of the --instruct file (up to num_samples), written and scored by
    `instructed_stories` with this run's sampling settings. Returns (samples, scores) as instructed_stories."""
    rows = read_instructions(instruct, num_samples)
    if not ckpt.get("instruct"):
        print("note: this model was not trained with instructions (its data was prepared without --instruct); "
              "it gets the same headers, but has never learned to follow them", file=sys.stderr)
    return instructed_stories(model, tok, rows, dev, ctx, seed, max_new_tokens, temperature, top_k, top_p)


def instructed_stories(model, tok, rows, dev, ctx, seed, max_new_tokens, temperature, top_k, top_p):
    """One story per instruction, each written after its header (instruct.header) and scored (instruct.score,
    which holds the reward rl.py trains on). Headers of the same length in tokens are sampled as one batch (a few
    batches in all, not one per story), in order of length, from one torch.Generator seeded with `seed`:
    reproducible on one device. eval.py --instruct and rl.py's evaluations use it.

    Args:
        rows: instructions as instruct.load_instructions gives them (dicts with words, features, summary).
        the rest: as generate_samples.
    Returns:
        (samples, scores): samples as generate_samples's (prompt, text, tokens, ended) plus the instruction and
        its score; scores, the list of those scores (instruct.summarize takes it).
    """
    prompts = [header(r["words"], r["features"], r["summary"]) for r in rows]
    encoded = tok.encode_batch(prompts)
    generator = torch.Generator(device=dev).manual_seed(seed)
    samples = [None] * len(rows)
    was_training = model.training
    model.eval()
    try:
        for length in sorted({len(ids) for ids in encoded}):
            batch = [i for i, ids in enumerate(encoded) if len(ids) == length]
            idx = torch.tensor([encoded[i] for i in batch], dtype=torch.long, device=dev)
            with ctx:  # the header (the whole prompt) stays in every window, as in training
                out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                     eos_token=tok.eot_token, vocab_limit=tok.vocab_size, generator=generator,
                                     keep=length)
            for i, (new, ended) in zip(batch, continuations(out, length, tok.eot_token)):
                samples[i] = {"prompt": prompts[i], "text": tok.decode(new), "tokens": len(new), "ended": ended}
    finally:
        model.train(was_training)
    scores = []
    for s, r in zip(samples, rows):
        scores.append(score(r["words"], r["features"], s["text"], s["ended"]))
        s.update({"instruction": r, "score": scores[-1]})
    return samples, scores


def instruct_rows(results):
    """Summary rows of an --instruct report (see instruct.summarize); [] for other reports.
    Raises ReportFieldError: a field of the wrong type (see summary_rows)."""
    ins = _section(results, "instruct")
    if not ins:
        return []
    rows = [("instructions file", _fmt(ins.get("file"), "str", "instruct.file")),
            ("trained with instructions", "yes" if ins.get("trained_with_instructions") else "no"),
            ("required words used", f"{_fmt(ins.get('word_share'), 'pct', 'instruct.word_share')} ("
                                    f"{_fmt(ins.get('words_used'), 'd', 'instruct.words_used')} of "
                                    f"{_fmt(ins.get('words_required'), 'd', 'instruct.words_required')})"),
            ("uses per used word",  # None in older reports too
             _fmt(ins.get("uses_per_used_word"), ".2f", "instruct.uses_per_used_word"))]
    r = _section(ins, "reward", "instruct.reward")  # missing in older reports
    parts = {k: _fmt(r.get(k), ".3f", f"instruct.reward.{k}") for k in REWARD_PARTS}
    rows.append(("reward (rl.py's)", "{reward} = {w} x ({words} - {overuse}) + {e} x {ending} - {loop}".format(
        **parts, w=f"{WORDS_WEIGHT:g}", e=f"{ENDING_WEIGHT:g}")))
    for name in CHECKABLE:
        f = _section(ins, name, f"instruct.{name}")
        field = f"instruct.{name}."
        rows.append((f"{name}: present when asked / not",
                     f"{_fmt(f.get('present_when_asked'), 'pct', field + 'present_when_asked')} of "
                     f"{_fmt(f.get('asked'), 'd', field + 'asked')} / "
                     f"{_fmt(f.get('present_when_not_asked'), 'pct', field + 'present_when_not_asked')} of "
                     f"{_fmt(f.get('not_asked'), 'd', field + 'not_asked')}"))
    return rows


def instruct_table(samples):
    """Markdown table of every instructed story: its words (used ones in bold), the checkable features asked and
    shown, and the story on one line."""
    def cell(text):
        return " ".join(str(text).split()).replace("|", "\\|")

    lines = ["| # | words (**used**) | asked | shown | story |", "|---|---|---|---|---|"]
    for i, s in enumerate(samples):
        sc = s["score"]
        ws = ", ".join(f"**{w}**" if u else w for w, u in zip(s["instruction"]["words"], sc["used"]))
        shown = ", ".join(name for name, v in sc["features"].items() if v)
        lines.append(f"| {i} | {cell(ws)} | {cell(', '.join(sc['asked'])) or '-'} | {shown or '-'} | "
                     f"{cell(s['text'])} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# 3. Reports

class ReportFieldError(ValueError):
    """A field of a report holds a value of the wrong type: a report edited by hand or damaged."""


_EXPECTED = {"str": "text", "d": "a whole number", ",": "a whole number"}  # other specs: "a number"


def _short(value, width=60):
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _fmt(value, spec, field="value"):
    """A report's value formatted for the summary: "-" for None; `spec` "str" (text as it is), "pct" (a share as
    a percentage) or a format spec ("d" and "," take whole numbers, the others any number; never a bool).
    Raises ReportFieldError naming `field` (its path in the report, "loss.perplexity") when the value is not of
    that kind."""
    if value is None:
        return "-"
    if spec == "str":
        ok = isinstance(value, str)
    elif spec in ("d", ","):
        ok = type(value) is int
    else:
        ok = type(value) in (int, float)
    if not ok:
        raise ReportFieldError(f"its field {field} holds {type(value).__name__} {_short(value)}, not "
                               f"{_EXPECTED.get(spec, 'a number')}")
    if spec == "str":
        return value
    if spec == "pct":
        return f"{100 * value:.1f}%"
    return format(value, spec)


def _section(results, key, field=None):
    """results[key] when it is an object (dict); {} when it is missing or None. Raises ReportFieldError otherwise."""
    value = results.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ReportFieldError(f"its field {field or key} holds {type(value).__name__} {_short(value)}, not an "
                               f"object")
    return value


def summary_rows(results):
    """(label, formatted value) pairs of a report, the rows of the summary, eval.md and --compare; "-" for a field
    the report lacks (older reports). Raises ReportFieldError naming the first field whose value has the wrong
    type (a number replaced by text or a list: a report edited by hand or damaged)."""
    loss, stories, judge = _section(results, "loss"), _section(results, "stories"), _section(results, "judge")
    model = _section(results, "model")
    rows = [("checkpoint", _fmt(results.get("checkpoint"), "str", "checkpoint")),
            ("iteration", _fmt(model.get("iter_num"), "d", "model.iter_num")),
            ("parameters", _fmt(model.get("params"), ",", "model.params")),
            ("tokenizer", _fmt(model.get("tokenizer"), "str", "model.tokenizer"))]
    if loss:
        rows += [("scored text", _fmt(loss.get("source"), "str", "loss.source")
                  + (" (first max_tokens only)" if loss.get("partial") else "")),
                 ("tokens scored", _fmt(loss.get("tokens_scored"), ",", "loss.tokens_scored")),
                 ("window / overlap", f"{_fmt(loss.get('block_size'), 'd', 'loss.block_size')} / "
                                      f"{_fmt(loss.get('overlap'), 'd', 'loss.overlap')}"),
                 ("loss (nats/token)", _fmt(loss.get("nats_per_token"), ".4f", "loss.nats_per_token")),
                 ("perplexity", _fmt(loss.get("perplexity"), ".2f", "loss.perplexity")),
                 ("bits per byte", _fmt(loss.get("bits_per_byte"), ".4f", "loss.bits_per_byte"))]
    if stories:
        rows += [("samples", _fmt(stories.get("num_samples"), "d", "stories.num_samples")),
                 ("mean length (tokens)", _fmt(stories.get("tokens"), ".1f", "stories.tokens")),
                 ("mean length (words)", _fmt(stories.get("words"), ".1f", "stories.words")),
                 ("ended with <|endoftext|>", _fmt(stories.get("ended"), "pct", "stories.ended")),
                 ("distinct-1 / 2 / 3", " / ".join(_fmt(stories.get(f"distinct_{n}"), ".3f", f"stories.distinct_{n}")
                                                   for n in (1, 2, 3))),
                 ("longest repeated n-gram (words)", _fmt(stories.get("longest_repeat"), ".1f",
                                                          "stories.longest_repeat")),
                 ("words not in train split", _fmt(stories.get("oov"), "pct", "stories.oov"))]
    rows += instruct_rows(results)
    if judge:
        rows += [(f"judge {c} (1-10)", _fmt(judge.get(c), ".2f", f"judge.{c}")) for c in CRITERIA]
        graded, unparseable = (_fmt(judge.get(k), "d", f"judge.{k}") for k in ("graded", "unparseable"))
        total = "-" if "-" in (graded, unparseable) else f"{judge['graded'] + judge['unparseable']}"
        rows += [("judge answers parsed", f"{graded} of {total} ({_fmt(judge.get('model'), 'str', 'judge.model')})")]
    return rows


def markdown_table(names, row_lists):
    """A Markdown table: one column per report, one row per label (in first-seen order; "-" where missing)."""
    labels = list(dict.fromkeys(label for rows in row_lists for label, _ in rows))
    cells = [dict(rows) for rows in row_lists]

    def esc(cell):
        return str(cell).replace("|", "\\|")

    lines = ["| | " + " | ".join(map(esc, names)) + " |", "|---" * (len(names) + 1) + "|"]
    lines += ["| " + esc(label) + " | " + " | ".join(esc(c.get(label, "-")) for c in cells) + " |"
              for label in labels]
    return "\n".join(lines)


def markdown_report(results):
    """The short eval.md: the summary table and the first three stories."""
    out = [f"# Evaluation of {results['checkpoint']}", "", markdown_table(["value"], [summary_rows(results)]), ""]
    samples = results.get("samples") or []
    if samples and results.get("instruct"):
        out += ["## Stories on request", "", instruct_table(samples), ""]
    elif samples:
        out += ["## Stories", ""]
        for s in samples[:3]:
            story = (s["prompt"] + "\\*\\*\\*" + s["text"]).replace("\n", "\n> ")
            grades = f" (judge: {', '.join(f'{c} {v:g}' for c, v in s['grades'].items())})" if s.get("grades") else ""
            out += [f"> {story}", "", f"{s['tokens']} tokens{', ended' if s['ended'] else ''}{grades}", ""]
        out += ["(*** marks where the prompt ends and the model's continuation starts.)", ""]
    return "\n".join(out)


def load_report(path):
    """A report written by eval.py (UTF-8 JSON, at most REPORT_LIMIT bytes). Raises UserError if it is missing,
    not a regular file, too large, not JSON, or not such a report."""
    try:
        results = json.loads(read_text(path, "the report", REPORT_LIMIT))
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{path} is not a JSON file ({e})") from None
    if not isinstance(results, dict) or results.get("kind") != _REPORT_KIND:
        raise UserError(f"{path} is not a report written by eval.py")
    return results


def compare_reports(paths):
    """Markdown table of saved reports side by side, one column per path. Raises UserError: see load_report; also
    a report whose field holds a value of the wrong type (naming the report and the field)."""
    row_lists = []
    for path in paths:
        try:
            row_lists.append(summary_rows(load_report(path)))
        except ReportFieldError as e:
            raise UserError(f"{path} is damaged or was edited: {e}; write it again with eval.py") from None
    return markdown_table(paths, row_lists)


# --------------------------------------------------------------------------------------------------------------

def check_settings():
    """Reject impossible settings before anything is loaded (each value against its kind, then the rest)."""
    check_values(globals(), {**dict.fromkeys(("block_size", "num_samples", "max_tokens", "vocab_tokens"), "count0"),
                             "batch_size": "count", "seed": "seed", "judge_timeout": "rate"})
    if overlap < -1:
        raise UserError(f"overlap must be -1 (block_size // 2) or 0 and more, got {overlap}")
    if max_tokens == 1:
        raise UserError("max_tokens=1 leaves nothing to predict: use 0 (all) or at least 2")
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if text:
        check_text_file(text)  # a FIFO or /dev/zero fails now, not after the model is loaded
    if instruct:
        if num_samples < 1:
            raise UserError("--instruct writes num_samples stories: use num_samples of 1 or more")
        read_instructions(instruct, num_samples)  # a malformed file fails before the model is loaded
    if judge_url:
        if not judge_url.startswith(("http://", "https://")):
            raise UserError(f"judge_url {judge_url!r} is not an http:// or https:// URL "
                            f"(e.g. http://localhost:8000/v1)")
        if not judge_model:
            raise UserError("the judge needs --judge_model=NAME (the model name its server expects)")
        if num_samples < 1:
            raise UserError("the judge grades the samples: use num_samples of 1 or more")


def main():
    config = configure(globals(), doc=__doc__)
    if compare:  # a separate job: no model, only saved reports
        paths = [p.strip() for p in compare.split(",") if p.strip()]
        if not paths:
            raise UserError("--compare takes report paths separated by commas: --compare=a.json,b.json")
        print(compare_reports(paths))
        return
    print(json.dumps(config), file=sys.stderr)
    check_settings()
    t0 = time.time()
    dev, device_type, precision = resolve_device(device, dtype, quantize=quantize)
    ckpt_path = f"{out_dir}/{checkpoint}"
    model, tok, ckpt = load_model(ckpt_path, device=dev)
    prepared = data_dir or (ckpt.get("config") or {}).get("data_dir", "")
    meta, problems, data_note = None, {}, ""
    if prepared:
        try:
            meta, problems = read_meta(prepared, required=())
        except UserError as e:
            if not text:
                raise
            data_note = str(e)  # --text does not need the data: only the word list is lost
    stream, counts, source = text_to_score(tok, prepared, meta, problems, ckpt_path)
    window, window_overlap = check_window(model.config.block_size, block_size or None,
                                          None if overlap == -1 else overlap)
    json_path = report or os.path.join(out_dir, "eval.json")
    md_path = json_path.removesuffix(".json") + ".md"
    check_writable(json_path, md_path)

    n_params = model.num_params()  # counted before quantization, whose int8 weights are not parameters
    if quantize:
        model = quantize_int8(model)
    model = speed_up(model)  # the fast path (fast.py): the loss without all the logits in memory at once
    ctx = autocast(device_type, precision)
    result = {"kind": _REPORT_KIND, "version": 1, "checkpoint": ckpt_path, "settings": config,
              "model": {"iter_num": ckpt.get("iter_num"), "params": n_params,
                        "tokenizer": tok.spec.get("name"), "model_args": ckpt["model_args"],
                        "val_loss_at_save": ckpt.get("val_loss")},
              "device": dev, "dtype": precision}
    if num_samples:  # before the loss, so a wrong judge URL fails early
        words_note = data_note or problems.get("train") or ("" if meta else
                                                            f"no prepared data{f' in {prepared}' if prepared else ''}")
        result.update(measure_stories(model, tok, dev, ctx, prepared, meta, words_note, ckpt))

    t = time.time()
    n_used = min(len(stream), max_tokens) if max_tokens else len(stream)
    res = exact_loss(model, stream[:n_used], window, window_overlap, batch_size, dev, ctx,
                     progress=progress_printer(sys.stderr))
    # bits per byte with the whole text's tokens/bytes ratio (an estimate when max_tokens cuts the stream)
    result["loss"] = {"source": source, **loss_summary(res, counts["tokens"], counts["bytes"]),
                      "loss_sum": res["loss_sum"], "tokens_scored": res["tokens_scored"],
                      "tokens": counts["tokens"], "bytes": counts["bytes"], "documents": counts["documents"],
                      "partial": n_used < len(stream), "block_size": window, "overlap": window_overlap,
                      "windows": res["windows"], "time_s": round(time.time() - t, 2)}
    result["time_s"] = round(time.time() - t0, 2)

    for label, value in summary_rows(result):
        print(f"{label:>34}: {value}")
    try:
        write_text_atomic(json.dumps(result, indent=1, ensure_ascii=False) + "\n", json_path)
        write_text_atomic(markdown_report(result), md_path)
    except OSError as e:
        raise UserError(f"could not write the report {json_path}: {e.strerror or e}") from None
    print(f"wrote {json_path} and {md_path}")


def text_to_score(tok, prepared, meta, problems, ckpt_path):
    """What the loss is measured on, checked before any model work: the --text file (encoded as prepare.py
    would), else the validation.bin of the prepared data. Returns (token stream, counts: dict with tokens,
    bytes and documents of the whole text, source path). Raises UserError naming the fix when there is none."""
    if text:
        docs = text_documents(text)
        stream = encode_documents(tok, docs)
        counts = {"tokens": len(stream), "bytes": sum(len(d.encode("utf-8")) for d in docs), "documents": len(docs)}
        source = text
    else:
        if not prepared:
            raise UserError(f"{ckpt_path} does not record its data directory: pass --data_dir=DIR (prepared by "
                            f"prepare.py) or --text=FILE")
        if meta is None:
            raise UserError(f"no prepared data in {prepared} (meta.json missing): run `python prepare.py "
                            f"--data_dir={prepared}` first, pass --data_dir=DIR, or score a file with --text=FILE")
        if problems["validation"]:
            raise UserError(problems["validation"])
        if meta["tokenizer"]["sha256"] != tok.spec["sha256"]:
            raise UserError(f"{prepared} was prepared with the tokenizer {meta['tokenizer'].get('name')}, not "
                            f"the checkpoint's ({tok.spec['name']}): pass --data_dir= the data it was trained on, "
                            f"or score a file with --text=FILE")
        stream = np.memmap(os.path.join(prepared, "validation.bin"), dtype=np.dtype(meta["dtype"]), mode="r")
        counts = meta["splits"]["validation"]
        source = os.path.join(prepared, "validation.bin")
    if counts["tokens"] < 2:
        raise UserError(f"{source} holds {counts['tokens']} token(s): at least 2 are needed to score one")
    return stream, counts, source


def progress_printer(stream, every=10.0):
    """The progress display of the exact loss: a callable(done, total) for exact_loss's `progress` that writes
    "loss: N of M windows" to `stream` at most once every `every` seconds, rewriting one line in place (\\r), and
    ends that line when done, but only when `stream` is a terminal. A file or pipe (a log, a test, `2> err.txt`)
    gets nothing: dozens of progress lines are noise there, and the summary says what was scored."""
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return None
    last, shown = [time.time()], [False]

    def progress(done, total):
        if done >= total:
            if shown[0]:
                print(file=stream, flush=True)  # ends the line the display rewrote
        elif time.time() - last[0] >= every:
            last[0], shown[0] = time.time(), True
            print(f"\rloss: {done:,} of {total:,} windows", end="", file=stream, flush=True)

    return progress


def check_writable(json_path, md_path):
    """Raise UserError now, before the model work, if the report could not be written later, or if writing it
    would replace a file that is not an earlier report (a checkpoint given as --report by mistake, a folder):
    the JSON must be a report of eval.py (load_report) and the Markdown must start as markdown_report's do."""
    for path, is_report in ((json_path, _is_report), (md_path, _is_markdown_report)):
        if os.path.isdir(path):
            raise UserError(f"the report path {path} is a folder: give a file name, e.g. --report={path}/eval.json")
        if os.path.lexists(path) and not is_report(path):
            raise UserError(f"{path} exists and is not a report written by eval.py: choose another --report path "
                            f"(nothing was overwritten)")
    folder = os.path.dirname(os.path.abspath(json_path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        if os.path.exists(folder):
            raise UserError(f"cannot write the report {json_path}: {folder} is a file, not a folder")
        folder = os.path.dirname(folder)  # the nearest existing folder: the report's folder may be created
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write the report {json_path}: {folder} is not writable; choose --report=PATH")


def _is_report(path):
    try:
        check_input_file(path, "the report", REPORT_LIMIT)  # not a FIFO, which would block the open
        with open(path, "rb") as f:
            if f.read(1) != b"{":  # a checkpoint (a zip: "PK"), a text...: not read whole
                return False
        load_report(path)
        return True
    except (OSError, UserError):
        return False


def _is_markdown_report(path):
    try:
        check_input_file(path, "the report's summary", REPORT_LIMIT)  # not a FIFO, which would block the open
        with open(path, encoding="utf-8") as f:
            return f.read(len("# Evaluation of ")) == "# Evaluation of "
    except (OSError, UnicodeDecodeError, UserError):
        return False


def measure_stories(model, tok, dev, ctx, prepared, meta, words_note, ckpt=None):
    """The stories part of the report: sample num_samples stories, their metrics (words outside the train split
    when the prepared data is usable; else words_note says why not) and, with --judge_url, the judge's grades.
    Returns dict with "stories", "samples" and, when judged, "judge"."""
    t = time.time()
    if instruct:
        samples, scored = instructed_samples(model, tok, dev, ctx, ckpt)
    else:
        samples = generate_samples(model, tok, PROMPTS, num_samples, max_new_tokens, temperature, top_k, top_p,
                                   seed, dev, ctx)
    vocab, read = None, None
    if not words_note:
        try:
            vocab, read = train_vocabulary(prepared, meta, vocab_tokens)
        except UserError as e:
            words_note = str(e)
    if words_note:
        print(f"words not in train split: skipped ({words_note})", file=sys.stderr)
    out = {"stories": {**story_metrics(samples, vocab), "time_s": round(time.time() - t, 2),
                       "train_words": len(vocab) if vocab is not None else None, "train_tokens_read": read},
           "samples": samples}
    if instruct:
        out["instruct"] = {"file": instruct, "trained_with_instructions": bool((ckpt or {}).get("instruct")),
                           **summarize(scored)}
    if judge_url:
        key = os.environ.get(judge_key_env) if judge_key_env else None
        print(f"judge: grading {num_samples} stories with {judge_model} at {judge_url}", file=sys.stderr)

        def judge_log(done, total):  # progress, on a terminal only (as progress_printer's)
            if done % 10 == 0 and done < total:
                print(f"judge: {done} of {total} graded", file=sys.stderr, flush=True)

        out["judge"] = judge_samples(samples, judge_url, judge_model, key, judge_timeout, judge_temperature,
                                     log=judge_log if sys.stderr.isatty() else None)
    return out


if __name__ == "__main__":
    run(main)

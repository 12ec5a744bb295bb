"""Write stories with a trained model.

    python sample.py --start="Once upon a time" --num_samples=3
    python sample.py --start=FILE:prompt.txt --temperature=0.7 --top_k=50
    python sample.py --quantize=int8                # int8 weights and matmuls on CPU
    python sample.py --words=dog,ball,happy --features=Dialogue --start=""   # a story on request (instruct.py)

Loads out_dir/checkpoint (train.py's best_model_params.pt by default) and decodes with the tokenizer stored in
it, so the data directory is not needed. Each sample stops at <|endoftext|> or after max_new_tokens tokens.
Stories are printed as they are written, token by token; the speed in tokens/s goes to stderr at the end.
"""

import json
import sys
import time

import torch

from checkpoint import load_model, quantize_int8
from configurator import (DTYPES, UserError, available_memory, check_values, configure, read_text, resolve_device,
                          run)
from fast import speed_up
from instruct import header_tokens, instructed_prompt
from model import SAMPLING_DEFAULTS, KVCache, check_sampling
from tokenizer import StreamDecoder

# -----------------------------------------------------------------------------
out_dir = "out"                         # directory that holds the checkpoint
checkpoint = "best_model_params.pt"     # file name inside out_dir
start = "Once upon a time"              # the prompt, or FILE:path to read it from a file
num_samples = 3                         # stories to write
max_new_tokens = SAMPLING_DEFAULTS["max_new_tokens"]  # tokens per story at most
temperature = SAMPLING_DEFAULTS["temperature"]  # < 1 sharper, > 1 more random, 0 greedy
top_k = SAMPLING_DEFAULTS["top_k"]  # sample among the k most likely tokens (0: all)
top_p = SAMPLING_DEFAULTS["top_p"]  # nucleus sampling: smallest set with this much probability (1.0: all)
seed = 1337
device = "auto"                         # auto, cpu, mps, cuda, cuda:N
dtype = "auto"                          # auto, float32, bfloat16, float16
quantize = ""                           # "int8": dynamic int8 quantization of the Linear layers (CPU only)
words = ""                              # words the story should use, "dog,ball,happy": written before it (instruct.py)
features = ""                           # features to ask for, "Dialogue,BadEnding"
summary = ""                            # what the story is about, in a sentence
# -----------------------------------------------------------------------------


PROMPT_LIMIT = 1 << 20  # bytes: a prompt file larger than this is not a prompt (a model sees a few thousand tokens)


def read_prompt(path):
    """The prompt of --start=FILE:path: the UTF-8 text of the file as an editor wrote it (a leading byte-order mark
    dropped), with any number of lines. Raises UserError (configurator.read_text): missing, not a regular file
    (/dev/zero, a FIFO, a folder), over PROMPT_LIMIT bytes, or not UTF-8."""
    return read_text(path, "the prompt file of --start=FILE:", PROMPT_LIMIT,
                     "a prompt is the opening of a story: put a few lines in the file")


def instructed(prompt, info):
    """The prompt behind the instruction header of --words, --features and --summary (instruct.instructed_prompt:
    the bytes prepare.py --instruct trains on), or the prompt as it is when they are blank.

    Args:
        prompt: str; info: load_model's info dict about the checkpoint (its "instruct" says whether it was trained
            with instructions: if not, a note goes to stderr when a header is added).
    Returns:
        str, the prompt to sample after.
    Raises:
        UserError: a field instruct.header refuses ("bad instruction: ...").
    """
    out = instructed_prompt(prompt, words, features, summary)
    if out != prompt and not info.get("instruct"):
        print("note: this model was not trained with instructions (its data was not prepared with "
              "prepare.py --instruct): it will likely ignore them", file=sys.stderr)
    return out


def main():
    config = configure(globals(), doc=__doc__)
    print(json.dumps(config), file=sys.stderr)  # stdout holds only the stories
    check_values(globals(), {"num_samples": "count", "seed": "seed"})
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    dev, _, precision = resolve_device(device, dtype, quantize=quantize)
    # --start itself is valid UTF-8 (configure checks every value); a FILE: prompt is checked as it is read
    prompt = read_prompt(start[5:]) if start.startswith("FILE:") else start

    model, tok, info = load_model(f"{out_dir}/{checkpoint}", device=dev)
    prompt = instructed(prompt, info)
    need, free = KVCache.bytes_needed(model.config, num_samples, 4), available_memory(dev)
    if free is not None and need > free:
        raise UserError(f"num_samples={num_samples:,} stories at once need about {need / 1e9:,.1f} GB for the "
                        f"key/value cache, more than the {free / 1e9:,.1f} GB free on {dev}: lower num_samples")
    if quantize:
        model = quantize_int8(model)
    else:  # weights stored in the sampling precision: each new token reads half the bytes of float32 weights
        model = model.to(DTYPES[precision])
    model = speed_up(model)  # the fast path (fast.py): on a CPU, attention in float32, which is faster there
    ids = tok.encode_prompt(prompt)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    generator = torch.Generator(device=dev).manual_seed(seed)
    steps = model.generate_stream(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  eos_token=tok.eot_token, vocab_limit=tok.vocab_size, generator=generator,
                                  keep=header_tokens(tok, prompt))  # an instruction header stays in view
    # All rows are sampled together as one batch (one forward pass per token for every story), so the random
    # draws, and the stories, are those of generating them at once. The story on screen is printed as its tokens
    # arrive; the ones after it collect tokens meanwhile and, when their turn comes, print what they have so far
    # at once and then go on live.
    new = [[] for _ in range(num_samples)]  # each row's tokens, up to its end-of-text
    ended = [False] * num_samples
    row, shown, dec = 0, 0, StreamDecoder(tok)  # the row on screen, and how many of its tokens are printed

    def print_ready():
        """Print the row on screen's tokens not printed yet; when it has ended, finish it and show the next."""
        nonlocal row, shown
        while row < num_samples:
            print(dec.push(new[row][shown:]), end="", flush=True)
            shown = len(new[row])
            if not ended[row]:
                return
            print(dec.flush())
            print("-" * 80)
            row, shown = row + 1, 0
            if row < num_samples:
                print(prompt, end="", flush=True)

    print(prompt, end="", flush=True)
    t0 = time.perf_counter()
    for step in steps:
        for r, t in enumerate(step.tolist()):
            if t == tok.eot_token:
                ended[r] = True
            elif not ended[r]:
                new[r].append(t)
        print_ready()
    seconds = time.perf_counter() - t0
    ended[:] = [True] * num_samples  # generation is over: print what is left of every story
    print_ready()
    n = sum(map(len, new))
    print(f"{n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s", file=sys.stderr)


if __name__ == "__main__":
    run(main)

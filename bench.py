"""Measure how fast this machine trains, samples and prepares data, as ratios to ceilings measured in the same run.

    python bench.py                                   # everything, on the default device
    python bench.py --only=train --model_config=config/tinystories_15m.py --device=cuda
    python bench.py --json_path=bench.json            # also write the results as JSON
    python bench.py --only=train --nanogpt_dir=../nanoGPT   # and nanoGPT's train.py on the same shape, side by side

1. matmul: FLOP/s of a large square matmul in float32 and in bfloat16: the device's ceilings.
2. train: tokens/s, achieved FLOP/s and MFU (model FLOPs utilisation: achieved / ceiling of the dtype in use,
   with the ceiling's matmul timed again just before each step, the median of the steps' ratios) of
   the training step of train.py (forward, backward, clipping, AdamW), median of `steps` timed steps after
   `warmup` steps, in the modes of MODES, each adding one change to the one before: baseline (float32, eager,
   plain AdamW, default allocator), allocator (CPU: keep_freed_memory), autocast (mixed precision in `dtype`),
   fused (fused AdamW), train.py (fast.speed_up: the head and cross-entropy in chunks and, on a CPU, the fused
   norms, attention and dropout; and the config's optimizer, e.g. Muon: exactly what train.py runs by default)
   and compiled (train.py + torch.compile).
   Each mode runs in a fresh process, which also gives its peak memory.
   With --nanogpt_dir (a local checkout of github.com/karpathy/nanoGPT, not part of this project) and a CPU
   device, nanoGPT's own train.py runs too, in a subprocess on random tokens with the same shape and batch
   (float32, eager: what it does on a CPU), for its tokens/s and peak resident memory.
   FLOPs per token = 6 N + 12 n_layer n_embd block_size, with N the
   non-embedding parameters plus the LM head (Kaplan et al. 2020, with the attention term of Chowdhery et al.
   2022, app. B).
   recipes: the cost of a training step under the GPT-2 recipe and the modern one at the same shape
   (config/tinystories_1m_bpe.py and tinystories_1m_modern.py, each with its own optimizer), alternating in one
   process: ms per step and the modern step's cost as a multiple of GPT-2's, the factor that turns one recipe's
   step count into the other's for the same CPU time.
3. sample: new tokens/s for 200 new tokens at batch 1 and batch 8, with the KV cache and with full re-forward;
   on CPU also float32 and int8 (dynamic quantization) at batch 1.
4. prepare: MB/s of text and tokens/s of prepare.py on a corpus made by repeating the shared TinyStories sample's
   training text to 10 x `prepare_mb` MB, against tiktoken's own batch encoding of the same documents on the same
   cores, and the peak resident memory of prepare.py (all its processes) on that corpus and on one a tenth of its
   size. A `prepare_mb` below the sample's size takes its first stories instead (and the same share of the
   validation stories), so that small sizes stay small.
Nothing here is part of the test suite; tests/test_bench.py only checks that it runs at tiny sizes.
"""

import copy
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, fields

import torch

from configurator import DTYPES, UserError, autocast, configure, resolve_device, run
from checkpoint import quantize_int8
from files import write_text_atomic
from model import GPT, RECIPE, GPTConfig, padded_vocab_size
from fast import speed_up
from optim import configure_optimizer
from plumbing import keep_freed_memory
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
only = "matmul,train,recipes,sample,prepare"  # which parts to run
model_config = "config/tinystories_30m.py"  # model shape and batch of the train and sample parts
vocab_size = 50257                      # used when the config does not pin one (GPT-2's)
batch_size = 0                          # 0: the config's micro-batch
steps = 10                              # timed training steps (the median is reported)
warmup = 3                              # untimed steps first (compilation happens here)
compile_mode = True                     # also time train.py's step under torch.compile
matmul_size = 0                         # 0: 4096 on GPUs, 2048 on CPUs
sample_tokens = 200
prepare_mb = 10.0                       # training text of the prepare part at 1x, MB (10x is also measured)
sample_dir = "../shared/data/tinystories-sample"
ranks = "../shared/tokenizers/gpt2.tiktoken"
device = "auto"
dtype = "auto"
json_path = ""                          # write the results here as JSON
nanogpt_dir = ""                        # a local checkout of karpathy/nanoGPT: also run its train.py, same shape (CPU)
# -----------------------------------------------------------------------------


def sync(dev):
    """Wait for the device to finish queued work, so wall-clock time measures it."""
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    elif dev == "mps":
        torch.mps.synchronize()


def timed(fn, dev, repeat, warm):
    """Median seconds of `repeat` calls of fn() after `warm` untimed calls."""
    for _ in range(warm):
        fn()
    sync(dev)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ceiling_size(device_type):
    """The side of the square matmul that measures the ceiling: matmul_size, else 4096 on GPUs and 2048 on CPUs."""
    return matmul_size or (4096 if device_type == "cuda" else 2048)


def bench_matmul(dev, n):
    """FLOP/s of an n x n matmul in float32 and bfloat16 (2 n^3 FLOPs each)."""
    out = {}
    for name in ("float32", "bfloat16"):
        a = torch.randn(n, n, device=dev, dtype=getattr(torch, name))
        b = torch.randn(n, n, device=dev, dtype=getattr(torch, name))
        out[name] = 2 * n ** 3 / timed(lambda: a @ b, dev, 5, 2)
    return out


def model_shape():
    """The model of the config file: every GPTConfig field it sets (shape and recipe switches; the others keep
    GPTConfig's defaults, which are train.py's), the vocabulary padded as train.py pads it, and the micro-batch.
    Returns (GPTConfig fields as a dict, batch size). Raises UserError for a missing file or a bad shape."""
    if not os.path.isfile(model_config):
        raise UserError(f"model_config {model_config!r} not found")
    cfg = runpy.run_path(model_config)
    args = {f.name: cfg[f.name] for f in fields(GPTConfig) if f.name in cfg}
    args["vocab_size"] = padded_vocab_size(cfg.get("vocab_size") or vocab_size)
    return asdict(GPTConfig(**args)), batch_size or cfg.get("batch_size", 32)


def optimizer_of_config():
    """The `optimizer` setting of the config file (train.py's default, "adamw", when it sets none)."""
    return runpy.run_path(model_config).get("optimizer", "adamw")


def recipe(args):
    """The recipe switches of GPTConfig fields `args` that differ from GPT-2's, as text ("GPT-2" when none do)."""
    changed = [f"{f.name}={args[f.name]}" for f in fields(GPTConfig)
               if f.name in RECIPE and args[f.name] != f.default]
    return ", ".join(changed) or "GPT-2"


# The training step, one optimisation added at a time:
# (name, keep freed memory, autocast, fused AdamW, fast.speed_up, compile).
# "baseline" is the reference loop (model.py's GPT in float32, eager, plain AdamW); "train.py" is what train.py does
# by default (with the config's optimizer).
MODES = [("baseline", False, False, False, False, False), ("allocator", True, False, False, False, False),
         ("autocast", True, True, False, False, False), ("fused", True, True, True, False, False),
         ("train.py", True, True, True, True, False), ("compiled", True, True, True, True, True)]


def train_mode(mode, args, batch, dev, precision, n_steps, n_warmup, optimizer="adamw", ceiling_n=2048):
    """Time the training step of train.py in one mode of MODES, in this process (bench_train runs each mode in a
    fresh one, so the allocator setting and peak memory are the mode's own). Returns a dict with ms_per_step,
    tokens_per_s, flops_per_token, the dtype used, mfu (the median over the steps of each one's model FLOP/s over
    the matmul FLOP/s timed just before it), ceiling_tflops (the median of those) and peak_memory_gb (CUDA:
    allocated tensors; else the process's peak resident memory, Linux ru_maxrss). `optimizer` (configure_optimizer's)
    is used by the modes with the fast path; the ones before it use AdamW. ceiling_n: the side of the ceiling's
    matmul (this process does not see the settings of bench.py's command line: bench_train passes ceiling_size's)."""
    import resource
    name, keep_memory, use_autocast, fused, fast, use_compile = next(m for m in MODES if m[0] == mode)
    device_type = dev.split(":")[0]
    if keep_memory and device_type == "cpu":
        keep_freed_memory()
    cfg = GPTConfig(**args)
    torch.manual_seed(0)
    model = GPT(cfg).to(dev)
    n_params = model.num_params(non_embedding=True) + model.lm_head.weight.numel()
    if fused:
        opt = configure_optimizer(model, 0.1, 1e-4, (0.9, 0.95), device_type, optimizer if fast else "adamw")
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False, fused=False)
    step_dtype = precision if use_autocast else "float32"
    ctx = autocast(device_type, step_dtype)
    if fast:
        model = speed_up(model)
    fwd = torch.compile(model) if use_compile else model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=dev)
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=dev)

    scaler = torch.amp.GradScaler(device_type, enabled=False)  # train.py's, off unless float16 on CUDA

    def step():  # the optimizer step of train.py with one micro-step
        with ctx:
            _, loss = fwd(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    # MFU against the matmul ceiling timed just before each step: on a shared machine the ceiling itself moves within
    # seconds (dev/speed-log.md), so a ceiling measured minutes earlier would make the ratio a coin toss
    n = ceiling_n
    a, b = (torch.randn(n, n, device=dev, dtype=DTYPES[step_dtype]) for _ in range(2))
    for _ in range(n_warmup):
        step()
    times, ceilings = [], []
    for _ in range(n_steps):
        ceilings.append(2 * n ** 3 / timed(lambda: a @ b, dev, 3, 1))
        times.append(timed(step, dev, 1, 0))
    seconds = statistics.median(times)
    if device_type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 2 ** 30
    flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    mfu = statistics.median(batch * cfg.block_size * flops_per_token / t / c for t, c in zip(times, ceilings))
    return {"dtype": step_dtype, "ms_per_step": seconds * 1e3, "tokens_per_s": batch * cfg.block_size / seconds,
            "flops_per_token": flops_per_token, "peak_memory_gb": peak, "mfu": mfu,
            "ceiling_tflops": statistics.median(ceilings) / 1e12}


def bench_train(dev, precision):
    """Tokens/s, FLOP/s, MFU and peak memory of the training step in each mode of MODES, each in a fresh process.
    FLOPs per token = 6 N + 12 n_layer n_embd block_size (see the module docstring)."""
    args, batch = model_shape()
    results = {"model": {**args, "batch_size": batch}, "params": GPT(GPTConfig(**args)).num_params()}
    here = os.path.dirname(os.path.abspath(__file__))
    for mode, *_ in MODES:
        if mode == "compiled" and not compile_mode or mode == "allocator" and not dev == "cpu":
            continue
        call = json.dumps([mode, args, batch, dev, precision, steps, warmup, optimizer_of_config(),
                           ceiling_size(dev.split(":")[0])])
        code = (f"import sys, json; sys.path.insert(0, {here!r}); import bench; "
                f"print(json.dumps(bench.train_mode(*json.loads(sys.argv[1]))))")
        proc = subprocess.run([sys.executable, "-c", code, call], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"train mode {mode} failed:\n{proc.stderr}")
        r = results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        r["tflops"] = r["tokens_per_s"] * r["flops_per_token"] / 1e12
        r["speedup"] = r["tokens_per_s"] / results["baseline"]["tokens_per_s"]
    nanogpt = bench_nanogpt(args, batch, dev)
    if nanogpt:
        results["nanogpt"] = nanogpt
        for mode, *_ in MODES:
            if mode in results:
                results[mode]["memory_over_nanogpt"] = results[mode]["peak_memory_gb"] / nanogpt["peak_memory_gb"]
    return results


def bench_nanogpt(args, batch, dev):
    """Run nanoGPT's train.py (in `nanogpt_dir`) on the shape and batch of `args` for warmup + steps iterations,
    on random tokens in a temporary dataset, float32 on the CPU, one micro-batch per step, evaluation on 1 batch.
    Returns {"tokens_per_s" (median over the iterations after `warmup`), "peak_memory_gb" (the process's peak
    resident memory, from wait4), "command"}, or None with a note when it does not apply.
    Raises RuntimeError if that script fails."""
    import numpy as np
    if not nanogpt_dir:
        return None
    if dev != "cpu" or args["vocab_size"] > 2 ** 16:
        print("  nanoGPT: skipped (compared on the CPU, whose peak resident memory is that of the process; "
              "its data files hold uint16 ids)")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        tokens = np.random.default_rng(0).integers(0, args["vocab_size"], 2 ** 20, dtype=np.uint16)
        for name in ("train.bin", "val.bin"):
            tokens.tofile(os.path.join(tmp, name))
        if args["vocab_size"] != 50304:  # nanoGPT reads the vocabulary size from meta.pkl, else uses 50304
            import pickle
            with open(os.path.join(tmp, "meta.pkl"), "wb") as f:
                pickle.dump({"vocab_size": args["vocab_size"]}, f)
        flags = dict(dataset=tmp, out_dir=os.path.join(tmp, "out"), device="cpu", dtype="float32", compile=False,
                     batch_size=batch, gradient_accumulation_steps=1, max_iters=warmup + steps, eval_iters=1,
                     eval_interval=10 ** 9, log_interval=1, always_save_checkpoint=False,
                     dropout=float(args["dropout"]), bias=bool(args["bias"]),
                     **{k: int(args[k]) for k in ("block_size", "n_layer", "n_head", "n_embd")})
        cmd = [sys.executable, "train.py", *(f"--{k}={v}" for k, v in flags.items())]
        with open(os.path.join(tmp, "log.txt"), "w+") as log:
            proc = subprocess.Popen(cmd, cwd=nanogpt_dir, stdout=log, stderr=subprocess.STDOUT, text=True)
            _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone
            proc.returncode = os.waitstatus_to_exitcode(status)
            log.seek(0)
            out = log.read()
    if proc.returncode:
        raise RuntimeError(f"nanoGPT's train.py failed:\n{out[-2000:]}")
    # its log lines read "iter 3: loss 10.8, time 2345.67ms, mfu ..."; iteration 0 includes the evaluation
    ms = [float(line.split("time ")[1].split("ms")[0]) for line in out.splitlines()
          if line.startswith("iter ") and "time " in line and int(line.split()[1].rstrip(":")) >= warmup]
    return {"tokens_per_s": batch * args["block_size"] / (statistics.median(ms) / 1e3),
            "peak_memory_gb": usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 2 ** 30,
            "command": " ".join(cmd[1:])}


# The GPT-2 recipe and the modern one at the same shape (4 x 128, BPE 4,096 ids, 16 x 128 tokens per step)
RECIPE_CONFIGS = ("config/tinystories_1m_bpe.py", "config/tinystories_1m_modern.py")


def bench_recipes(dev, precision):
    """The cost of a training step under each recipe: train.py's step (the fast path, autocast in `precision`,
    clipping, the config's optimizer at its learning rates) for each config of RECIPE_CONFIGS, timed in this process
    in alternation, `steps` rounds after `warmup`, so that a machine whose speed moves slows both alike.
    Returns {config: {"recipe", "ms_per_step" (median), "cost" (its median over the first config's)}}."""
    import runpy

    from configurator import settings_block
    here = os.path.dirname(os.path.abspath(__file__))
    train_py = os.path.join(here, "train.py")
    defaults = runpy.run_path(train_py)  # train.py's settings, which a config file overrides
    defaults = {k: defaults[k] for k in settings_block(train_py)}
    device_type = dev.split(":")[0]
    if device_type == "cpu":
        keep_freed_memory()
    ctx = autocast(device_type, precision)
    steps_of = {}
    for path in RECIPE_CONFIGS:
        s = {**defaults, **{k: v for k, v in runpy.run_path(os.path.join(here, path)).items() if k in defaults}}
        args = {f.name: s[f.name] for f in fields(GPTConfig) if f.name in s}
        args["vocab_size"] = padded_vocab_size(s["vocab_size"] or vocab_size)
        torch.manual_seed(0)
        model = speed_up(GPT(GPTConfig(**args)).to(dev))
        opt = configure_optimizer(model, s["weight_decay"], s["learning_rate"], (s["beta1"], s["beta2"]),
                                  device_type, s["optimizer"], s["muon_lr"], s["muon_momentum"])
        x, y = torch.randint(0, args["vocab_size"], (2, s["batch_size"], s["block_size"]), device=dev)

        def step(model=model, opt=opt, x=x, y=y, clip=s["grad_clip"]):
            with ctx:
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps_of[path] = step, recipe(args)
    for _ in range(warmup):
        for step, _ in steps_of.values():
            step()
    times = {path: [] for path in steps_of}
    for _ in range(steps):
        for path, (step, _) in steps_of.items():
            times[path].append(timed(step, dev, 1, 0))
    first = statistics.median(times[RECIPE_CONFIGS[0]])
    return {path: {"recipe": steps_of[path][1], "ms_per_step": statistics.median(t) * 1e3,
                   "cost": statistics.median(t) / first} for path, t in times.items()}


def bench_sample(dev, device_type, precision):
    """New tokens/s for `sample_tokens` tokens at batch 1 and 8, with and without the KV cache, with the weights
    in `precision` as sample.py runs them; on CPU also batch 1 with the cache in float32 and with int8 dynamic
    quantization (sample.py --quantize=int8)."""
    args, _ = model_shape()
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args)).to(dev).eval()
    runs = [(b, cache, precision) for b in (1, 8) for cache in (True, False)]
    if device_type == "cpu":
        runs += [(1, True, "float32"), (1, True, "int8")]
    out = {}
    for batch, cache, dt in runs:
        net = quantize_int8(model) if dt == "int8" else copy.deepcopy(model).to(DTYPES[dt])
        prompt = torch.randint(0, args["vocab_size"], (batch, 4), device=dev)

        def gen(net=net, prompt=prompt, cache=cache):
            net.generate(prompt, sample_tokens, temperature=1.0, use_cache=cache)
        name = f"batch{batch}_{'cache' if cache else 'reforward'}" + ("" if dt == precision else f"_{dt}")
        out[name] = batch * sample_tokens / timed(gen, dev, 3, 1)
    out["cache_speedup_batch1"] = out["batch1_cache"] / out["batch1_reforward"]
    out["batch8_over_batch1"] = out["batch8_cache"] / out["batch1_cache"]
    return out


def tree_rss(pid):
    """Resident memory in bytes of a process and all its descendants (Linux /proc): (all resident pages,
    anonymous ones only). The difference is file pages mapped in (memory-mapped Arrow caches and .bin output),
    which the kernel can drop and re-read; anonymous memory is what must fit in RAM. (0, 0) if unavailable."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    family, total, anon = {pid}, 0, 0
    for _ in range(5):  # grandchildren too
        family |= {p for p, parent in parents.items() if parent in family}
    for p in family:
        try:
            with open(f"/proc/{p}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            total += int(fields["VmRSS"].split()[0]) * 1024
            anon += int(fields["RssAnon"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            pass
    return total, anon


def run_prepare(corpus_dir, data_dir, hf_home):
    """Run prepare.py on corpus_dir as a subprocess; return (seconds, peak resident bytes of its process tree,
    peak anonymous resident bytes)."""
    env = {**os.environ, "HF_HOME": hf_home, "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare.py"),
           f"--dataset={corpus_dir}", f"--tokenizer={ranks}", f"--data_dir={data_dir}",
           f"--num_proc={os.cpu_count()}"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[:] = map(max, peak, tree_rss(proc.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    _, err = proc.communicate()
    stop.set()
    watcher.join()
    if proc.returncode:
        raise RuntimeError(f"prepare.py failed: {err.strip().splitlines()[-1] if err.strip() else ''}")
    return time.perf_counter() - t, *peak


def first_stories(text, share):
    """The stories (blocks separated by a blank line) at the start of `text` that fill about `share` of its bytes;
    at least one."""
    data = text.encode()
    cut = data.find(b"\n\n", int(share * len(data)))
    return text if cut < 0 else data[:cut].decode() + "\n"


def bench_prepare():
    """prepare.py throughput and memory against the tokenizer's own batch encoding."""
    text = open(os.path.join(sample_dir, "train.txt"), encoding="utf-8").read()
    val = open(os.path.join(sample_dir, "validation.txt"), encoding="utf-8").read()
    share = prepare_mb * 1e6 / len(text.encode())
    if share < 1:  # less than the sample: its first stories, and as large a share of the validation stories
        text, val = first_stories(text, share), first_stories(val, share)
    copies = max(1, round(share))
    tok = load_tokenizer(ranks)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (1, 10):
            corpus = os.path.join(tmp, f"corpus{scale}")
            os.makedirs(corpus)
            with open(os.path.join(corpus, "train.txt"), "w", encoding="utf-8") as f:
                for _ in range(copies * scale):
                    f.write(text.rstrip("\n") + "\n\n")
            with open(os.path.join(corpus, "validation.txt"), "w", encoding="utf-8") as f:
                f.write(val)
            n_bytes = os.path.getsize(os.path.join(corpus, "train.txt")) + len(val.encode())
            seconds, peak, peak_anon = run_prepare(corpus, os.path.join(tmp, f"data{scale}"),
                                                   os.path.join(tmp, f"hf{scale}"))
            with open(os.path.join(tmp, f"data{scale}", "meta.json")) as f:
                meta = json.load(f)
            n_tokens = sum(s["tokens"] for s in meta["splits"].values())
            out[f"{scale}x"] = {"mb": n_bytes / 1e6, "seconds": seconds, "mb_per_s": n_bytes / 1e6 / seconds,
                                "tokens_per_s": n_tokens / seconds, "peak_rss_mb": peak / 1e6,
                                "peak_anon_mb": peak_anon / 1e6}
            if scale == 10:  # the library alone, same documents, same cores
                docs = [d for d in open(os.path.join(corpus, "train.txt"), encoding="utf-8").read().split("\n\n")
                        if d.strip()] + [d for d in val.split("\n\n") if d.strip()]
                t = time.perf_counter()
                n = sum(len(ids) for ids in tok.encode_batch(docs))
                lib_seconds = time.perf_counter() - t
                out["tiktoken_batch"] = {"tokens_per_s": n / lib_seconds, "mb_per_s": n_bytes / 1e6 / lib_seconds}
                del docs
    out["prepare_over_tiktoken"] = out["10x"]["tokens_per_s"] / out["tiktoken_batch"]["tokens_per_s"]
    out["memory_10x_over_1x"] = out["10x"]["peak_rss_mb"] / out["1x"]["peak_rss_mb"]
    out["anon_memory_10x_over_1x"] = out["10x"]["peak_anon_mb"] / out["1x"]["peak_anon_mb"]
    return out


def main():
    config = configure(globals(), doc=__doc__)
    parts = set(only.split(","))
    known = {"matmul", "train", "recipes", "sample", "prepare"}
    if parts - known:
        raise UserError(f"only: unknown parts {sorted(parts - known)}; choose from matmul,train,recipes,sample,prepare")
    if nanogpt_dir and not os.path.isfile(os.path.join(nanogpt_dir, "train.py")):
        raise UserError(f"nanogpt_dir={nanogpt_dir!r} has no train.py: pass the folder of a nanoGPT checkout "
                        f"(git clone https://github.com/karpathy/nanoGPT), or leave it empty")
    dev, device_type, precision = resolve_device(device, dtype)
    cpu = os.popen("lscpu 2>/dev/null | grep 'Model name'").read().split(":")[-1].strip() or "unknown CPU"
    machine = torch.cuda.get_device_name(dev) if device_type == "cuda" else f"{cpu}, {os.cpu_count()} cores"
    results = {"device": dev, "machine": machine, "dtype": precision, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "config": config}
    print(f"{machine}; device {dev}, dtype {precision}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if {"matmul", "train"} & parts:
        n = ceiling_size(device_type)
        results["matmul"] = bench_matmul(dev, n)
        print(f"matmul {n}x{n}: float32 {results['matmul']['float32'] / 1e12:.3f} TFLOP/s, "
              f"bfloat16 {results['matmul']['bfloat16'] / 1e12:.3f} TFLOP/s")
    if "train" in parts:
        r = results["train"] = bench_train(dev, precision)
        print(f"train {model_config}: {r['params'] / 1e6:.2f}M parameters ({r['params']:,}), recipe "
              f"{recipe(r['model'])}, batch {r['model']['batch_size']} x {r['model']['block_size']}; each mode "
              f"adds one change to the one above:")
        for mode, *_ in MODES:
            if mode in r:
                m = r[mode]
                print(f"  {mode:9s} {m['dtype']:9s} {m['ms_per_step']:9.1f} ms/step {m['tokens_per_s']:11,.0f} "
                      f"tokens/s {m['tflops']:8.3f} TFLOP/s  MFU {m['mfu'] * 100:5.1f}% of {m['ceiling_tflops']:.3f}  "
                      f"peak {m['peak_memory_gb']:.2f} GB  {m['speedup']:.2f}x baseline"
                      + (f"  memory {m['memory_over_nanogpt']:.2f}x nanoGPT" if "nanogpt" in r else ""))
        if "nanogpt" in r:
            m = r["nanogpt"]
            print(f"  nanoGPT train.py, float32 eager: {m['tokens_per_s']:,.0f} tokens/s, "
                  f"peak {m['peak_memory_gb']:.2f} GB "
                  f"({nanogpt_dir}/train.py {m['command'].split(' ', 1)[1]})")
    if "recipes" in parts:
        r = results["recipes"] = bench_recipes(dev, precision)
        print(f"recipes: train.py's step of each config in {precision}, alternating in one process, median of {steps}:")
        for path, m in r.items():
            print(f"  {path:32s} {m['ms_per_step']:8.1f} ms/step  {m['cost']:.2f}x  ({m['recipe']})")
    if "sample" in parts:
        r = results["sample"] = bench_sample(dev, device_type, precision)
        print(f"sample {sample_tokens} new tokens (tokens/s, {precision}): batch 1 cache {r['batch1_cache']:,.0f}, "
              f"re-forward {r['batch1_reforward']:,.0f} ({r['cache_speedup_batch1']:.1f}x); batch 8 cache "
              f"{r['batch8_cache']:,.0f}, re-forward {r['batch8_reforward']:,.0f}; "
              f"batch 8 / batch 1 {r['batch8_over_batch1']:.1f}x")
        if "batch1_cache_int8" in r:
            print(f"  batch 1 with the cache: float32 {r['batch1_cache_float32']:,.0f}, {precision} "
                  f"{r['batch1_cache']:,.0f}, int8 {r['batch1_cache_int8']:,.0f} tokens/s")
    if "prepare" in parts:
        r = results["prepare"] = bench_prepare()
        for scale in ("1x", "10x"):
            m = r[scale]
            print(f"prepare {scale} ({m['mb']:.0f} MB): {m['mb_per_s']:.1f} MB/s, {m['tokens_per_s']:,.0f} tokens/s, "
                  f"peak RSS {m['peak_rss_mb']:,.0f} MB, of it anonymous {m['peak_anon_mb']:,.0f} MB")
        print(f"  tiktoken batch encoding alone: {r['tiktoken_batch']['tokens_per_s']:,.0f} tokens/s; prepare.py "
              f"reaches {r['prepare_over_tiktoken']:.2f}x of it; peak memory 10x / 1x = {r['memory_10x_over_1x']:.2f} "
              f"(anonymous {r['anon_memory_10x_over_1x']:.2f})")
    if json_path:
        write_text_atomic(json.dumps(results, indent=2), json_path)


if __name__ == "__main__":
    run(main)

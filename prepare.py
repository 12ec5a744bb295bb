"""Download TinyStories (or read local text), tokenize it, and write one flat token stream per split.

    python prepare.py                                  # roneneldan/TinyStories from the Hugging Face hub
    python prepare.py --dataset=../shared/data/tinystories-sample --tokenizer=../shared/tokenizers/gpt2.tiktoken \\
                      --data_dir=data/sample           # offline, from local files

Writes into data_dir:
    train.bin, validation.bin   every document's tokens followed by <|endoftext|>, back to back, as one flat
                                array of uint16 (uint32 for vocabularies over 65,536 ids), read with np.memmap
    tokenizer.json              with --tokenizer=bpe: a byte-level BPE vocabulary of vocab_size ids trained on
                                the train split with Hugging Face `tokenizers`
    meta.json                   tokenizer, vocab_size, eot_token, dtype, and per split the number of documents,
                                tokens and UTF-8 bytes of text

A local --dataset is a file or a directory of .txt, .json, .jsonl or .parquet files; in a directory the split
comes from each file's name (train..., validation... / val... / dev...), and a single file is the train split. In .txt files, blocks separated by a blank line are
documents. When there is no validation split, a fixed val_fraction of train (chosen with `seed`) becomes one.
Re-running with the same inputs does nothing; --force rebuilds.
"""

import contextlib
import json
import os
import time

import numpy as np
import pyarrow.compute as pc

from checkpoint import atomic_file, lock_dir, write_text_atomic
from configurator import UserError, check_values, configure, run
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
dataset = "roneneldan/TinyStories"  # hub id, or a local file or directory
data_dir = "data/tinystories"       # where train.bin, validation.bin and meta.json go
tokenizer = "gpt2"                  # gpt2 (tiktoken), bpe (train one on the train split), or a tokenizer file
vocab_size = 4096                   # --tokenizer=bpe only: ids including <|endoftext|> (256 gives the 256 bytes + <|endoftext|>)
text_column = "text"                # the column that holds each document's text
val_fraction = 0.005                # share of train held out when the source has no validation split
seed = 1337                         # chooses that held-out share
num_proc = max(1, (os.cpu_count() or 1) // 2)  # tokenizer processes
shards = 1024                       # write each split in this many pieces, so memory stays bounded
force = False                       # rebuild even if meta.json says the data is up to date
# -----------------------------------------------------------------------------

EXTENSIONS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLITS = ("train", "validation")


def local_files(path):
    """Map split name -> list of files for a local file or directory, and the `datasets` builder to read them.
    Raises UserError for an unknown file type, mixed types, or files whose split cannot be told."""
    if os.path.isfile(path):
        paths = [path]
    else:
        paths = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if os.path.splitext(f)[1].lower() in EXTENSIONS)
        if not paths:
            raise UserError(f"{path} holds no {', '.join(EXTENSIONS)} files")
    builders = {EXTENSIONS.get(os.path.splitext(p)[1].lower()) for p in paths}
    if None in builders:
        raise UserError(f"{path}: unsupported file type; use {', '.join(EXTENSIONS)}")
    if len(builders) > 1:
        raise UserError(f"{path} mixes file types ({', '.join(sorted(builders))}); keep one type per dataset")
    files = {}
    for p in paths:
        stem = os.path.basename(p).split(".")[0].lower()
        if len(paths) == 1 or stem.startswith("train"):
            split = "train"  # a single file is the training text; validation is carved from it
        elif stem.startswith(("val", "dev")):
            split = "validation"
        elif stem.startswith("test"):
            continue
        else:
            raise UserError(f"cannot tell the split of {p}: name files train.* and validation.*")
        files.setdefault(split, []).append(p)
    if "train" not in files:
        raise UserError(f"{path} has no train file: name one train.*")
    return files, builders.pop()


def is_local(source):
    """True for an existing local path, False for a hub id. Raises UserError for a path that does not exist."""
    if os.path.exists(source):
        return True
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise UserError(f"dataset {source!r} not found: give a local file or directory, or a hub id like "
                        f"roneneldan/TinyStories")
    return False


def load_splits(source):
    """Load the train and validation splits as `datasets.Dataset`s (a validation split is carved from train
    when the source has none). Raises UserError when the source cannot be found or read."""
    import datasets
    local = is_local(source)
    try:
        if local:
            files, builder = local_files(source)
            kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=files, **kwargs)
        else:
            ds = datasets.load_dataset(source)
    except UserError:
        raise
    except Exception as e:
        where = "the file" if local else "the Hugging Face hub (offline? give a local path instead)"
        raise UserError(f"could not load {source!r} from {where}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if "validation" not in ds:
        n = len(ds["train"])
        n_val = max(1, round(n * val_fraction))
        if n < 2:
            raise UserError(f"{source}: train has {n} document(s), too few to hold out a validation split")
        parts = ds["train"].train_test_split(test_size=n_val, seed=seed, shuffle=True)
        ds = {"train": parts["train"], "validation": parts["test"]}
        print(f"no validation split in {source}: holding out {n_val} of {n} training documents (seed {seed})")
    return {split: ds[split] for split in SPLITS}


def read_meta(data_dir, required=SPLITS):
    """The one check of a prepared data directory (train.py, eval.py and prepare.py's up-to-date test use it):
    load data_dir/meta.json and check train.bin and validation.bin against it.

    Args:
        data_dir: a directory written by prepare.py.
        required: the splits that must be usable; a problem with one of them raises.
    Returns:
        (meta, problems): meta is the loaded meta.json (None when there is none and nothing is required);
        problems maps each split to what is wrong with its .bin ("" when nothing: its size is tokens x the
        dtype's bytes).
    Raises:
        UserError: no meta.json while splits are required, a damaged meta.json (missing keys, a dtype that cannot
        hold the vocabulary's ids), or a problem with a required split; each message names the prepare.py fix.
    """
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        if required:
            raise UserError(f"no prepared data in {data_dir} (meta.json missing): run "
                            f"`python prepare.py --data_dir={data_dir}` first")
        return None, {}
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        for name, value in [("vocab_size", meta["vocab_size"]),
                            *((f"{s}.{k}", meta["splits"][s][k]) for s in SPLITS for k in ("documents", "tokens", "bytes"))]:
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} is {value!r}, not a positive whole number")
        if not isinstance(meta["tokenizer"]["sha256"], str):
            raise TypeError("tokenizer.sha256 is not text")
        itemsize = np.dtype(meta["dtype"]).itemsize
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path} is damaged ({type(e).__name__}: {e}): re-run prepare.py with --force") from None
    if meta["dtype"] not in ("uint16", "uint32") or np.iinfo(meta["dtype"]).max < meta["vocab_size"] - 1:
        raise UserError(f"{meta_path}: token ids of a {meta['vocab_size']}-id vocabulary cannot be stored as "
                        f"{meta['dtype']}: re-run prepare.py with --force")
    problems = {}
    for split in SPLITS:
        bin_path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(bin_path):
            problems[split] = f"{bin_path} is missing: run `python prepare.py --data_dir={data_dir}` (with --force)"
        elif os.path.getsize(bin_path) != meta["splits"][split]["tokens"] * itemsize:
            problems[split] = f"{bin_path} does not match meta.json: re-run prepare.py with --force"
        else:
            problems[split] = ""
        if split in required and problems[split]:
            raise UserError(problems[split])
    return meta, problems


def train_bpe(texts, vocab_size, length=None):
    """Train a byte-level BPE vocabulary of `vocab_size` ids (the 256 bytes, <|endoftext|>, then merges; fewer
    when the text runs out of pairs to merge) with Hugging Face `tokenizers` (Rust, parallel).

    Args:
        texts: iterable of str or of lists of str (batches of documents); length: their number, for progress.
    Returns:
        Tokenizer of kind "bpe". No normalisation and no prefix space, so decoding is exact."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizer import EOT, Tokenizer, bpe_spec
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split rules, on bytes
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    hf.train_from_iterator(texts, trainer, length=length)
    return Tokenizer(bpe_spec(hf.to_str(pretty=False), "bpe"))


def fingerprint(source):
    """What identifies the input: the hub id, or each local file's path, size and modification time."""
    if not os.path.exists(source):
        return source
    paths = [source] if os.path.isfile(source) else sorted(
        os.path.join(source, f) for f in os.listdir(source) if os.path.splitext(f)[1].lower() in EXTENSIONS)
    return [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths]


def write_split(ds, f, dtype, n_shards, desc="writing"):
    """Write the "ids" column of a tokenized split back to back into the binary file object `f` as `dtype`, one
    contiguous slice of rows at a time, so memory stays bounded. Plain writes rather than a memmap: a full disk
    is then an OSError, not a SIGBUS that kills the process. Returns the number of tokens.
    Raises UserError if an id does not fit `dtype`, OSError if the write fails."""
    from tqdm import tqdm
    table = ds.with_format("arrow")
    limit = np.iinfo(dtype).max
    n_tokens = 0
    bounds = np.linspace(0, len(ds), min(n_shards, len(ds)) + 1).astype(int)
    for lo, hi in tqdm(list(zip(bounds[:-1], bounds[1:])), desc=desc):
        ids = pc.list_flatten(table[lo:hi]["ids"]).to_numpy()
        if ids.size and ids.max() > limit:
            raise UserError(f"token id {ids.max()} does not fit {np.dtype(dtype).name} (max {limit}): "
                            f"the tokenizer's ids exceed what this data type can hold")
        f.write(np.ascontiguousarray(ids, dtype=dtype))
        n_tokens += ids.size
    return n_tokens


def main():
    config = configure(globals(), doc=__doc__)
    print(json.dumps(config, indent=1))

    if shards < 1 or num_proc < 1:
        raise UserError(f"shards and num_proc must be at least 1, got {shards} and {num_proc}")
    check_values(globals(), {"seed": "seed"})
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1 (a share of train), got {val_fraction}")
    is_local(dataset)
    if tokenizer == "bpe":
        if not 256 <= vocab_size <= 1_000_000:
            raise UserError(f"vocab_size={vocab_size}: a byte-level BPE vocabulary holds the 256 bytes and "
                            f"<|endoftext|>, so use 256 to 1,000,000 (up to 65,536 keeps the data in uint16)")
        tok, tok_id = None, {"bpe_vocab_size": vocab_size}  # the vocabulary is trained below
    else:
        tok = load_tokenizer(tokenizer)
        tok_id = {"tokenizer_sha256": tok.spec["sha256"]}
    inputs = {"dataset": fingerprint(dataset), **tok_id, "text_column": text_column,
              "val_fraction": val_fraction, "seed": seed}
    meta_path = os.path.join(data_dir, "meta.json")
    lock_dir(data_dir, "prepare.py")  # one writer, and no train.py reading it meanwhile
    if not force:
        try:
            meta, problems = read_meta(data_dir, required=())
        except UserError:  # damaged: rebuild
            meta, problems = None, {}
        if (meta is not None and meta.get("inputs") == inputs and not any(problems.values())
                and os.path.isfile(os.path.join(data_dir, meta["tokenizer"].get("file", "")))):
            print(f"{data_dir} is up to date with these inputs (use --force to rebuild)")
            return

    t0 = time.time()
    splits = load_splits(dataset)
    for name, ds in splits.items():
        if text_column not in ds.column_names:
            raise UserError(f"{dataset} has no column {text_column!r} in its {name} split (columns: "
                            f"{', '.join(ds.column_names)}); choose one with --text_column=NAME")
        if len(ds) == 0:
            raise UserError(f"the {name} split of {dataset} is empty")
    if tok is None:
        train = splits["train"]
        batches = (train[i:i + 1000][text_column] for i in range(0, len(train), 1000))
        tok = train_bpe(batches, vocab_size, length=len(train))
        print(f"trained a {tok.vocab_size:,}-id BPE vocabulary on {len(train):,} training documents")
    dtype = np.uint16 if tok.vocab_size <= 2 ** 16 else np.uint32
    tok_file = "tokenizer.json" if tok.spec["kind"] == "bpe" else "tokenizer.tiktoken"

    def tokenize(batch):
        texts = [t for t in batch[text_column] if t and not t.isspace()]
        if not all(isinstance(t, str) for t in texts):
            raise UserError(f"column {text_column!r} does not hold text; choose another with --text_column=NAME")
        ids = [doc + [tok.eot_token] for doc in tok.encode_batch(texts)]
        return {"ids": ids, "len": [len(d) for d in ids], "n_bytes": [len(t.encode("utf-8")) for t in texts]}

    meta = {"dataset": dataset, "tokenizer": {**tok.describe(), "file": tok_file}, "vocab_size": tok.vocab_size,
            "eot_token": tok.eot_token, "dtype": np.dtype(dtype).name, "splits": {}, "inputs": inputs}
    if dtype == np.uint32:
        meta["dtype_note"] = "over 65,536 ids: tokens are stored as uint32, twice the size of uint16"
    tokenized = {}
    for name, ds in splits.items():
        tokenized[name] = ds.map(tokenize, batched=True, remove_columns=ds.column_names,
                                 num_proc=min(num_proc, len(ds)) if num_proc > 1 else None,
                                 desc=f"tokenizing {name}")
        if len(tokenized[name]) == 0:
            raise UserError(f"the {name} split of {dataset} is empty: it holds only blank documents")
    # Nothing is written before every split has been read and tokenized without error. Then every file is written
    # beside its final name and synced to disk, and only then swapped in: a full disk or a kill while writing
    # leaves the previous data as it was. The data directory carries its tokenizer, so training and sampling
    # need nothing else.
    try:
        with contextlib.ExitStack() as files:
            staged = [files.enter_context(atomic_file(os.path.join(data_dir, tok_file)))]
            staged[0].write(tok.spec["json" if tok.spec["kind"] == "bpe" else "ranks"])
            for name, ds in tokenized.items():
                staged.append(files.enter_context(atomic_file(os.path.join(data_dir, f"{name}.bin"), "wb")))
                n_tokens = write_split(ds, staged[-1], dtype, shards, f"writing {name}.bin")
                n_bytes = int(pc.sum(ds.with_format("arrow")[:]["n_bytes"]).as_py())
                meta["splits"][name] = {"documents": len(ds), "tokens": n_tokens, "bytes": n_bytes}
                print(f"{name}: {len(ds):,} documents, {n_tokens:,} tokens, {n_bytes:,} bytes "
                      f"({n_bytes / n_tokens:.2f} bytes/token)")
            for f in staged:  # a full disk shows here, before anything is replaced
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(meta_path):
                os.remove(meta_path)  # the swap: until the new meta.json is written, the directory looks incomplete
        write_text_atomic(json.dumps(meta, indent=2), meta_path)
    except OSError as e:
        raise UserError(f"could not write the prepared data in {data_dir}: {e.strerror or e}; the previous data "
                        f"there is unchanged: free some space and run prepare.py again") from None
    print(f"wrote {data_dir} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    run(main)

"""Download TinyStories (or read local text), tokenize it, and write one flat token stream per split.

    python prepare.py                                  # roneneldan/TinyStories from the Hugging Face hub
    python prepare.py --dataset=../shared/data/tinystories-sample --tokenizer=../shared/tokenizers/gpt2.tiktoken \\
                      --data_dir=data/sample           # offline, from local files
    python prepare.py --dataset=my_tales.txt --tokenizer=out/best_model_params.pt --data_dir=data/my_tales
                                                       # your own text, in a trained model's tokens, to fine-tune it

Writes into data_dir:
    train.bin, validation.bin   every document's tokens followed by <|endoftext|>, back to back, as one flat
                                array of uint16 (uint32 for vocabularies over 65,536 ids), read with np.memmap
    tokenizer.json              with --tokenizer=bpe: a byte-level BPE vocabulary of vocab_size ids trained on
                                the train split with Hugging Face `tokenizers`
    meta.json                   tokenizer, vocab_size, eot_token, dtype, and per split the number of documents,
                                tokens and UTF-8 bytes of text

A local --dataset is a file (the train split) or a directory of .txt, .json, .jsonl or .parquet files (.txt and
JSON also compressed as .gz, .bz2, .xz), found as `datasets` finds them: hub shards data/train-00000-of-00004.parquet,
split names in file or folder names (train, validation/valid/val/dev; test is not read), or else all train.
A .txt file with lines holding only <|endoftext|> (TinyStoriesV2-GPT4-train.txt) is split on those lines; other
.txt files on blank lines; a leading byte-order mark (what Windows editors write) is not text. The text is the
column named by --text_column; without a "text" column, "story" (TinyStories' name for it) or the only column is
read, and every row of it must hold text (a row that does not is refused, naming its file and row).
When there is no validation split, a fixed val_fraction of train (chosen with `seed`) becomes one.
Re-running with the same inputs does nothing; --force rebuilds.

--instruct (TinyStories' JSON archive, or any file with the same fields): each story is written after a header of
its `instruction.words`, `instruction.features` and `summary` (instruct.py, docs/instruct.md), and meta.json
records "instruct": true. Rows whose instructions are missing or malformed are kept as "Story:" and the story;
their number and the first one's reason are printed.
"""

import bz2
import codecs
import contextlib
import gzip
import hashlib
import json
import lzma
import os
import re
import socket
import time
import zlib

import numpy as np
import pyarrow.compute as pc

from configurator import UserError, check_values, configure, read_text, run
from files import MiB, atomic_file, check_input_file, lock_dir, write_text_atomic
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
dataset = "roneneldan/TinyStories"  # hub id, or a local file or directory
data_dir = "data/tinystories"       # where train.bin, validation.bin and meta.json go
tokenizer = "gpt2"                  # gpt2 (tiktoken), bpe (trained on the train split), a tokenizer file, a checkpoint
vocab_size = 4096                   # --tokenizer=bpe only: ids including <|endoftext|>, 256 to 1,000,000
text_column = "text"                # the column holding the text (if no "text" column: "story", or the only column)
val_fraction = 0.005                # share of train held out when the source has no validation split
seed = 1337                         # chooses that held-out share
num_proc = max(1, (os.cpu_count() or 1) // 2)  # tokenizer processes
shards = 1024                       # write each split in this many pieces, so memory stays bounded
force = False                       # rebuild even if meta.json says the data is up to date
instruct = False                    # each story after its instructions (Words:/Features:/Summary:/Story:; instruct.py)
# -----------------------------------------------------------------------------

EXTENSIONS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # what `datasets` also decompresses
ARCHIVES = (".tar", ".tar.gz", ".tgz", ".zip", ".7z")
SPLITS = ("train", "validation")
_CHUNK = 1 << 24  # bytes read at a time when checking a file
# batch_size x block_size of the smallest shipped configs (config/tinystories_cpu.py, *_1m_*): a split with fewer
# tokens cannot fill one of their batches, and train.py refuses it (tests/test_configs.py keeps this in step)
_SMALLEST_BATCH = 16 * 128
_QUIET_BELOW = 64 << 20  # bytes of local data read in seconds: prepared without progress bars
_META_LIMIT = 64 * MiB  # bytes: a meta.json is a few kB; a larger one is not prepare.py's
EOT_LINE = re.compile(r"^\s*<\|endoftext\|>\s*$", re.MULTILINE)  # a line holding only <|endoftext|>


def file_kind(path):
    """The `datasets` builder for a file, from its name: ("text" | "json" | "parquet" | None, compression), where
    compression is ".gz", ".bz2", ".xz" or "" (train.txt.gz -> ("text", ".gz"); a compressed .parquet -> None)."""
    stem, compression = os.path.splitext(path.lower())
    if compression not in COMPRESSIONS:
        stem, compression = path.lower(), ""
    builder = EXTENSIONS.get(os.path.splitext(stem)[1])
    return (None if builder == "parquet" and compression else builder), compression


def names(paths, root=None, limit=2):
    """A short list of file names for messages: "a.txt" or "a.json, b.json and 48 more" (`limit` names shown)."""
    shown = [os.path.relpath(p, root) if root else p for p in paths[:limit]]
    return ", ".join(shown) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def data_files(path):
    """Every readable file (by file_kind) at a local path: the file itself, or the files under a directory
    (hidden ones skipped), listed by `datasets`."""
    if os.path.isfile(path):
        return [path]
    from datasets.data_files import resolve_pattern
    try:
        return sorted(f for f in resolve_pattern("**", base_path=path) if file_kind(f)[0])
    except FileNotFoundError:
        return []


def archives(path):
    """The archives (ARCHIVES: .tar.gz, .zip, ...) directly in the folder `path`: listed among the files not read."""
    if not os.path.isdir(path):
        return []
    return [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.lower().endswith(ARCHIVES)]


def local_files(path):
    """Map split name -> list of files for a local file or directory, and the `datasets` builder to read them.

    A single file is the train split. In a directory, `datasets` finds the files and their splits by its own
    data-files conventions (https://huggingface.co/docs/datasets/repository_structure): hub shards such as
    data/train-00000-of-00004.parquet; else split names in file or folder names (train/training,
    validation/valid/val/dev; test files are not read); else every file is train. Raises UserError for an
    unknown file type, an archive, mixed types, or no train file."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns
    if os.path.isfile(path):
        found = {"train": [path]}
    else:
        try:
            found = DataFilesDict.from_patterns(get_data_patterns(path), base_path=path)
        except (EmptyDatasetError, FileNotFoundError):
            found = {}
    found = {str(split): [f for f in paths if file_kind(f)[0]] for split, paths in found.items()}
    if not any(found.values()):
        archive = next((p for p in ([path] if os.path.isfile(path) else os.listdir(path))
                        if p.lower().endswith(ARCHIVES)), None)
        if archive:
            raise UserError(f"{archive} is an archive: unpack it (tar -xzf, unzip) and give the folder it unpacks "
                            f"to as --dataset")
        kinds = f"{', '.join(EXTENSIONS)} files (or .txt/.json/.jsonl compressed as {', '.join(COMPRESSIONS)})"
        if os.path.isfile(path):
            raise UserError(f"{path}: unsupported file type; use {kinds}")
        raise UserError(f"{path} holds no {kinds}")
    builders = sorted({file_kind(f)[0] for paths in found.values() for f in paths})
    if len(builders) > 1:
        raise UserError(f"{path} mixes file types ({', '.join(builders)}); keep one type per dataset")
    if not found.get("train"):
        raise UserError(f"{path} has no train file: name one train.* (and the validation files validation.*)")
    files = {split: found[split] for split in SPLITS if found.get(split)}
    used = {f for paths in files.values() for f in paths}
    unused = sorted(f for f in set(data_files(path)) | set(archives(path)) if f not in used)
    if unused:
        layout = ("the hub's data/ shards, as the hub loads this folder" if any(
            os.path.relpath(f, path).startswith("data" + os.sep) for f in used) else "the layout found")
        print(f"read {names(sorted(used), path, 6)} ({layout}); not read: {names(unused, path, 12)} (test files, "
              f"archives, or not train/validation files in that layout; give one as --dataset to read it instead)")
    return files, builders[0]


def is_local(source):
    """True for an existing local path, False for a hub id. Raises UserError for a path that does not exist, or
    that is neither a folder nor a regular file (a device such as /dev/zero, a FIFO: files.check_input_file)."""
    if os.path.exists(source):
        if not os.path.isdir(source):
            check_input_file(source, "--dataset")  # read in pieces: any size
        return True
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise UserError(f"dataset {source!r} not found: give a local file or directory, or a hub id like "
                        f"roneneldan/TinyStories")
    return False


def check_hub_reachable(source):
    """Fail fast when the Hugging Face hub cannot be reached, instead of after the hub client's retries.

    Skipped when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set (then `datasets` reads its cache of an earlier
    download) and behind a proxy (HTTPS_PROXY, ALL_PROXY: only the client knows how to go through it). Otherwise
    one TCP connection to the hub (HF_ENDPOINT, huggingface.co by default) with a 5 s timeout.
    Raises UserError naming the local --dataset and the offline variables as the ways out."""
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in flags):
        return
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    from urllib.parse import urlparse
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as e:
        raise UserError(f"cannot reach {url.hostname} to download {source} ({e.strerror or e}; offline?): give "
                        f"local files with --dataset=PATH, or, if it was downloaded before, read the cached copy "
                        f"with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python prepare.py ...") from None


def check_text(path, role):
    """Read a .txt, .json or .jsonl file once, decompressed as its name says, before `datasets` does: return True
    when it has a line holding only <|endoftext|> (then those lines, and only those, separate its documents).
    `role` names the file in messages ("the train split", "text file").
    A leading byte-order mark (EF BB BF, as Windows editors write UTF-8) is not text: it is skipped here and by
    text_documents.
    Raises UserError naming the file when it is not UTF-8 (with the byte offset), is not the compressed file
    its name says, is not a regular file (files.check_input_file: a folder, a device, a FIFO), or holds no text.
    Reads _CHUNK bytes at a time, so any file size fits in memory."""
    check_input_file(path, role)  # a regular file (not a FIFO, a device, a folder); read in chunks: any size
    compression = file_kind(path)[1]
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text, separated, tail = 0, False, False, ""
    blank = " \t\r\n[]{}," if file_kind(path)[0] == "json" else None  # JSON of nothing: [], [{}], ...
    try:
        with COMPRESSIONS.get(compression, open)(path, "rb") as f:
            while True:
                chunk = f.read(_CHUNK)
                if offset == 0 and chunk.startswith(codecs.BOM_UTF8):  # a byte-order mark is not text
                    chunk, offset = chunk[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
                    if not chunk:
                        continue  # the first read held only the mark: the end of the file is the next read's
                pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
                try:
                    text = decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as e:
                    where = " of the uncompressed text" if compression else ""
                    gzipped = offset == 0 and chunk[:2] == b"\x1f\x8b"
                    hint = f"; it looks gzip-compressed: name it {os.path.basename(path)}.gz" if gzipped else ""
                    raise UserError(f"{path} is not UTF-8 text: the byte at offset {offset - pending + e.start:,}"
                                    f"{where} ({e.object[e.start:e.start + 1]!r}) cannot be decoded; save the file "
                                    f"as UTF-8{hint}") from None
                if not chunk:
                    break
                offset += len(chunk)
                has_text = has_text or bool(text.strip(blank))
                if not separated and blank is None:  # a .txt file
                    text = tail + text  # a separator line cut by the chunk boundary is found whole
                    separated = "<|endoftext|>" in text and EOT_LINE.search(text) is not None
                    tail = text[text.rfind("\n") + 1:]
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        if compression:
            raise UserError(f"{path} is not a valid {compression} file, as its name says "
                            f"(truncated, corrupt or not compressed?): {e}") from None
        raise UserError(f"could not read {path}: {e}") from None
    if not has_text:
        raise UserError(f"{path} ({role}) is empty: it holds no text; fill it or remove it")
    return separated


def check_parquet(path, split):
    """Raise UserError naming the file when it is not a regular file (files.check_input_file), not a Parquet file
    or has no rows (reads only its footer)."""
    import pyarrow.parquet as pq
    check_input_file(path, f"the {split} split")
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{path} is not a Parquet file, as its name says (truncated or corrupt?): {e}") from None
    if rows == 0:
        raise UserError(f"{path} (the {split} split) is empty: it has no rows; fill it or remove it")


def text_documents(path, separated=None):
    """Yield the documents of one text file (decompressed as its name says) the way prepare.py reads every .txt,
    and eval.py --text too: where the file has lines holding only <|endoftext|> (TinyStoriesV2-GPT4-*.txt), the
    runs of lines between them, stripped of surrounding whitespace; else the blocks separated by a blank line
    ("\\n\\n" after universal-newline translation, as `datasets` reads paragraphs). Blocks of only whitespace
    are skipped. Reads _CHUNK characters at a time (and the rest of a line), so memory is bounded by the longest
    line, not the file.

    A leading byte-order mark (what Windows editors write first) is not text and is dropped.

    Args:
        path: the file. separated: whether it has <|endoftext|> lines (check_text's answer); None: check now.
    Yields:
        str, one document at a time.
    Raises:
        UserError: see check_text (when separated is None)."""
    path = os.fspath(path)
    if separated is None:
        separated = check_text(path, "text file")
    with COMPRESSIONS.get(file_kind(path)[1], open)(path, "rt", encoding="utf-8-sig") as f:
        if separated:
            lines = []
            for line in f:
                if line.strip() != "<|endoftext|>":
                    lines.append(line)
                    continue
                if text := "".join(lines).strip():
                    yield text
                lines = []
            if text := "".join(lines).strip():
                yield text
            return
        rest = ""
        while chunk := f.read(_CHUNK):
            blocks = (rest + chunk + f.readline()).split("\n\n")
            rest = blocks.pop()
            yield from (b for b in blocks if b and not b.isspace())
        if rest and not rest.isspace():
            yield rest


def _documents(paths, separated):
    """{"text": document} for each document of the files (Dataset.from_generator's form); see text_documents."""
    for path, sep in zip(paths, separated):
        for text in text_documents(path, sep):
            yield {"text": text}


def read_local(split, paths, builder):
    """Read one split's local files (all of one builder) into a `datasets.Dataset`. .txt files are read by
    text_documents (split on lines holding only <|endoftext|> where a file has such lines, else on blank lines;
    it says which). Raises UserError naming the file: unreadable, not UTF-8, empty, a JSON line that is not
    JSON, or no documents at all (only <|endoftext|> lines or whitespace)."""
    import datasets
    if builder == "parquet":
        for path in paths:
            check_parquet(path, split)
        return datasets.load_dataset("parquet", data_files=paths, split="train")
    separated = [check_text(p, f"the {split} split") for p in paths]
    if builder == "json":
        try:
            return datasets.load_dataset("json", data_files=paths, split="train")
        except Exception:
            for path in paths:
                find_json_error(path)
            raise
    for rule, files in (("blank lines (no <|endoftext|> lines)", [p for p, s in zip(paths, separated) if not s]),
                        ("lines holding only <|endoftext|>", [p for p, s in zip(paths, separated) if s])):
        if files:
            print(f"{split}: {names(files)}: documents split on {rule}")
    if next(_documents(paths, separated), None) is None:  # `datasets` cannot make a dataset of no rows
        raise UserError(f"{names(paths)} (the {split} split) holds no documents, only <|endoftext|> lines and "
                        f"whitespace: put text between the separator lines")
    stamp = json.dumps(["text_documents v2", fingerprint(paths), separated])  # reread when a file changes
    return datasets.Dataset.from_generator(
        _documents, gen_kwargs={"paths": paths, "separated": separated},
        fingerprint=hashlib.sha256(stamp.encode()).hexdigest()[:32],
        features=datasets.Features({"text": datasets.Value("string")}))


def find_json_error(path):
    """Raise UserError naming the file and line when the .json/.jsonl file `path` (decompressed as its name says)
    is neither JSON lines nor one JSON document; return quietly when it parses (the error was elsewhere). Used
    after `datasets` fails, whose own error names neither. Reads line by line unless the file is one document
    (it starts with "[")."""
    with COMPRESSIONS.get(file_kind(path)[1], open)(path, "rt", encoding="utf-8-sig") as f:
        first = ""
        while (char := f.read(1)) and char.isspace():
            pass
        first = char
    with COMPRESSIONS.get(file_kind(path)[1], open)(path, "rt", encoding="utf-8-sig") as f:
        if first == "[":  # one JSON document (TinyStories_all_data's data00.json)
            try:
                json.load(f)
            except ValueError as e:
                raise UserError(f"{path} line {getattr(e, 'lineno', '?')}: not valid JSON ({e}); fix or remove "
                                f"that line") from None
            return
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    value = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno}); fix or "
                                    f"remove that line (a .jsonl file holds one JSON object per line)") from None
                if not isinstance(value, dict):
                    raise UserError(f"{path} line {number}: a JSON {type(value).__name__}, not an object with a "
                                    f"text field; each line must be an object like {{\"text\": \"...\"}}")


STORY_COLUMN = "story"  # TinyStories' name for the text column of its JSON archive (data00.json ...)


def choose_column(splits, requested, source, files=None):
    """The column holding each document's text, chosen by its name, never by which columns happen to hold text:
    `requested` (--text_column); or, when that is the default "text" and the train split has no such column,
    "story" (TinyStories' name for the text, in its JSON archive), or else the split's only column. It says which
    one it reads and why. Every row of that column, in every split, must then hold text: a row whose value is a
    number, a list, null or missing is refused, naming its file and row (first_non_text), rather than skipped or
    answered by reading another column.

    Args:
        splits: split name -> datasets.Dataset. requested: the column asked for. source: --dataset, for
            messages. files: split name -> its local files in the order they were read (None: the hub).
    Returns:
        str, the column.
    Raises:
        UserError naming the split's files: a split lacks the column (listing the columns it has), the column
        holds values that are not text (its type), or a row's value is not text (the file and row).
    """
    import datasets

    def is_text(feature):
        return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")

    column = requested
    train = splits["train"]
    if requested == "text" and "text" not in train.column_names:
        where = names(files["train"]) if files else source
        if STORY_COLUMN in train.column_names:
            column = STORY_COLUMN
            print(f"no 'text' column in {where}: reading the {column!r} column (TinyStories' name for the text); "
                  f"pass --text_column=NAME to choose another")
        elif len(train.column_names) == 1:
            column = train.column_names[0]
            print(f"no 'text' column in {where}: reading {column!r}, its only column")
    for name, ds in splits.items():
        where = f" ({names(files[name])})" if files else ""
        if column not in ds.column_names:
            raise UserError(f"{source} has no column {column!r} in its {name} split"
                            f"{where if files and files[name] != [source] else ''} (columns: "
                            f"{', '.join(ds.column_names)}); choose one with --text_column=NAME")
        feature = ds.features[column]
        mixed = isinstance(feature, datasets.Json)  # JSON rows of several types: text in some, not in others
        if not is_text(feature) and not mixed:
            held = (feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__.lower())
            raise UserError(f"column {column!r} of the {name} split{where} holds {held} values, not text; "
                            f"choose another with --text_column=NAME")
        if mixed or ds.data.column(column).null_count:
            bad = first_non_text(ds, column, files[name] if files else None, f"the {name} split of {source}")
            place, value = bad or (f"the {name} split of {source}", "mixed JSON values")
            raise UserError(f"{place}: the {column!r} value is {value}, not text; fix or remove that row, or "
                            f"choose another column with --text_column=NAME")
    return column


def _describe(value):
    """A value that is not text, for messages: "missing (null)", "int 5", "list ['a', 'b']" (cut to 40 chars)."""
    if value is None:
        return "missing (null)"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _file_rows(path, column):
    """(place, value of `column`) for each row of one local .json/.jsonl/.parquet file, in the order `datasets`
    reads them: place is "FILE line N" (JSON Lines), "FILE row N" (a JSON list or Parquet, counting from 1)."""
    kind = file_kind(path)[0]
    if kind == "parquet":
        import pyarrow.parquet as pq
        n = 0
        for batch in pq.ParquetFile(path).iter_batches(columns=[column]):
            for value in batch.column(0).to_pylist():
                n += 1
                yield f"{path} row {n}", value
        return
    if kind != "json":
        return  # .txt documents are text by construction
    opener = COMPRESSIONS.get(file_kind(path)[1], open)
    with opener(path, "rt", encoding="utf-8-sig") as f:
        first = ""
        while (char := f.read(1)) and char.isspace():
            pass
        first = char
    with opener(path, "rt", encoding="utf-8-sig") as f:
        if first == "[":
            for n, row in enumerate(json.load(f), 1):
                yield f"{path} row {n}", row.get(column) if isinstance(row, dict) else None
            return
        for number, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                yield f"{path} line {number}", row.get(column) if isinstance(row, dict) else None


def first_non_text(ds, column, files=None, label="the split"):
    """The first row of the Dataset `ds` whose `column` is not text (a number, a list, null, missing).

    Args:
        ds: a split. column: its text column. files: the local files it was read from, in order (each is read
            again here, row by row: this runs only when something is wrong); None: look in `ds` itself, and
            name the row "LABEL, row N" (label: the split, e.g. "the train split of roneneldan/TinyStories").
    Returns:
        (place, description) such as ("data/train.jsonl line 3", "int 5"), or None when every row holds text.
    """
    if files:
        for path in files:
            for place, value in _file_rows(path, column):
                if not isinstance(value, str):
                    return place, _describe(value)
    n = 0
    for batch in ds.select_columns([column]).iter(batch_size=10_000):
        for value in batch[column]:
            n += 1
            if not isinstance(value, str):
                return f"{label}, row {n}", _describe(value)
    return None


def load_splits(source, requested_column):
    """Load the train and validation splits as `datasets.Dataset`s (a validation split is carved from train
    when the source has none) and choose the text column. Returns (splits, column).
    Raises UserError when the source cannot be found or read."""
    import datasets
    local = is_local(source)
    files = None
    try:
        if local:
            files, builder = local_files(source)
            ds = {split: read_local(split, paths, builder) for split, paths in files.items()}
        else:
            ds = datasets.load_dataset(source)
    except UserError:
        raise
    except Exception as e:
        where = "the file" if local else "the Hugging Face hub (offline? give a local path instead)"
        raise UserError(f"could not load {source!r} from {where}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    column = choose_column({split: ds[split] for split in SPLITS if split in ds}, requested_column, source, files)
    if "validation" not in ds:
        n = len(ds["train"])
        n_val = max(1, round(n * val_fraction))
        if n < 2:
            raise UserError(f"{source}: train has {n} document(s), too few to hold out a validation split")
        parts = ds["train"].train_test_split(test_size=n_val, seed=seed, shuffle=True)
        ds = {"train": parts["train"], "validation": parts["test"]}
        print(f"no validation split in {source}: holding out {n_val} of {n} training documents (seed {seed})")
    return {split: ds[split] for split in SPLITS}, column


def instruct_splits(splits, column):
    """--instruct: each split's rows as one text column, "instruct_text", holding instruct.document(row): the
    header of the row's instruction words, features and summary, then the story in `column`. Rows without usable
    instructions are kept as plain stories after "Story:"; prints how many per split and the first one's reason.
    Returns (splits, "instruct_text")."""
    from instruct import document

    def build(batch):
        keys = list(batch)
        texts, problems = [], []
        for values in zip(*batch.values()):
            text, problem = document(dict(zip(keys, values)), column)
            texts.append(text)
            problems.append(problem)
        return {"instruct_text": texts, "instruct_problem": problems}

    out = {}
    for name, ds in splits.items():
        if "instruction" not in ds.column_names and "summary" not in ds.column_names:
            print(f"{name}: no 'instruction' or 'summary' column: every story is used without instructions")
        # never from the cache: `datasets` fingerprints `build` but not instruct.py, so an edit there (another
        # layout) would silently reuse the old texts
        built = ds.map(build, batched=True, remove_columns=ds.column_names, desc=f"instructions {name}",
                       load_from_cache_file=False)
        problems = built["instruct_problem"]
        bad = [i for i, p in enumerate(problems) if p]
        if bad:
            print(f"{name}: {len(bad):,} of {len(problems):,} rows used without instructions, as 'Story:' and "
                  f"the story (first: row {bad[0]}: {problems[bad[0]]})")
        out[name] = built.remove_columns("instruct_problem")
    return out, "instruct_text"


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
    text = read_text(meta_path, "the prepared data's meta.json", _META_LIMIT)  # a regular file of sane size
    try:
        meta = json.loads(text)
        counts = [(f"{s}.{k}", meta["splits"][s][k]) for s in SPLITS for k in ("documents", "tokens", "bytes")]
        for name, value in [("vocab_size", meta["vocab_size"]), *counts]:
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
        texts: iterable of str or of lists of str (batches of documents); length: their number (a hint to the
            library).
    Returns:
        Tokenizer of kind "bpe". No normalisation and no prefix space, so decoding is exact. Prints nothing."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizer import EOT, Tokenizer, bpe_spec
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split rules, on bytes
    hf.decoder = decoders.ByteLevel()
    # no progress display of the library's: off a terminal it prints a blank line per stage; prepare.py says in
    # one line what it trains, before and after
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    hf.train_from_iterator(bounded_batches(texts), trainer, length=length)
    return Tokenizer(bpe_spec(hf.to_str(pretty=False), "bpe"))


def bounded_batches(texts):
    """Regroup documents (an iterable of str or of lists of str) into lists of pieces (tokenizer.cut_pieces) of at
    most BATCH_CHARS characters in all, for BPE training: the library's memory grows with the text it is given
    at once (about 280 bytes per character of one long line), and training on the pieces counts the same
    pre-tokens as training on the documents."""
    from tokenizer import BATCH_CHARS, cut_pieces
    batch, size = [], 0
    for item in texts:
        for text in [item] if isinstance(item, str) else item:
            for piece in cut_pieces(text):
                if batch and size + len(piece) > BATCH_CHARS:
                    yield batch
                    batch, size = [], 0
                batch.append(piece)
                size += len(piece)
    if batch:
        yield batch


def fingerprint(source):
    """What identifies the input: the hub id, or each local file's path, size and modification time (a list of
    paths is taken as those files)."""
    if isinstance(source, str) and not os.path.exists(source):
        return source
    paths = source if isinstance(source, list) else data_files(source)
    return [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths]


def write_split(ds, f, dtype, n_shards, desc="writing", quiet=False):
    """Write the "ids" column of a tokenized split back to back into the binary file object `f` as `dtype`, one
    contiguous slice of rows at a time, so memory stays bounded, with a progress bar named `desc` unless quiet.
    Plain writes rather than a memmap: a full disk is then an OSError, not a SIGBUS that kills the process.
    Returns the number of tokens.
    Raises UserError if an id does not fit `dtype`, OSError if the write fails."""
    from tqdm import tqdm
    table = ds.with_format("arrow")
    limit = np.iinfo(dtype).max
    n_tokens = 0
    bounds = np.linspace(0, len(ds), min(n_shards, len(ds)) + 1).astype(int)
    for lo, hi in tqdm(list(zip(bounds[:-1], bounds[1:])), desc=desc, disable=quiet):
        ids = pc.list_flatten(table[lo:hi]["ids"]).to_numpy()
        if ids.size and ids.max() > limit:
            raise UserError(f"token id {ids.max()} does not fit {np.dtype(dtype).name} (max {limit}): "
                            f"the tokenizer's ids exceed what this data type can hold")
        f.write(np.ascontiguousarray(ids, dtype=dtype))
        n_tokens += ids.size
    return n_tokens


def main():
    config = configure(globals(), doc=__doc__)
    if tokenizer != "bpe":
        del config["vocab_size"]  # the size of a vocabulary to train: only --tokenizer=bpe has one
    print("prepare.py " + " ".join(f"--{k}={v}" for k, v in config.items()))

    check_values(globals(), {"shards": "count", "num_proc": "count", "seed": "seed"})
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1 (a share of train), got {val_fraction}")
    local = is_local(dataset)
    if not local:
        check_hub_reachable(dataset)
    # small local data is read in seconds: no progress bars, whose finished lines would crowd the summary
    quiet = local and sum(os.path.getsize(f) for f in data_files(dataset)) < _QUIET_BELOW
    if quiet:
        import datasets
        datasets.disable_progress_bars()
    if tokenizer == "bpe":
        if not 256 <= vocab_size <= 1_000_000:
            raise UserError(f"vocab_size={vocab_size}: a byte-level BPE vocabulary holds the 256 bytes and "
                            f"<|endoftext|>, so use 256 to 1,000,000 (up to 65,536 keeps the data in uint16)")
        tok, tok_id = None, {"bpe_vocab_size": vocab_size}  # the vocabulary is trained below
    else:
        tok = load_tokenizer(tokenizer)
        tok_id = {"tokenizer_sha256": tok.spec["sha256"]}
    inputs = {"dataset": fingerprint(dataset), **tok_id, "text_column": text_column,
              "val_fraction": val_fraction, "seed": seed, **({"instruct": True} if instruct else {})}
    meta_path = os.path.join(data_dir, "meta.json")
    if os.path.isdir(data_dir):
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
    splits, column = load_splits(dataset, text_column)
    if instruct:
        splits, column = instruct_splits(splits, column)
    for name, ds in splits.items():
        if len(ds) == 0:
            raise UserError(f"the {name} split of {dataset} is empty")
    if tok is None:
        train = splits["train"]
        batches = (train[i:i + 1000][column] for i in range(0, len(train), 1000))
        t_bpe = time.time()
        print(f"training a BPE vocabulary of up to {vocab_size:,} ids on {len(train):,} training documents...",
              end="", flush=True)  # one line, finished when it is done
        tok = train_bpe(batches, vocab_size, length=len(train))
        print(f" {tok.vocab_size:,} ids in {time.time() - t_bpe:.1f}s")
    dtype = np.uint16 if tok.vocab_size <= 2 ** 16 else np.uint32
    tok_file = "tokenizer.json" if tok.spec["kind"] == "bpe" else "tokenizer.tiktoken"

    def tokenize(batch):
        texts = [t for t in batch[column] if t and not t.isspace()]  # choose_column checked they are strings
        eot = np.array([tok.eot_token], dtype=np.uint32)  # 4 bytes a token while tokenizing: any vocabulary fits
        ids = [np.concatenate([doc, eot]) for doc in tok.encode_batch(texts, dtype=np.uint32)]
        return {"ids": ids, "len": [len(d) for d in ids], "n_bytes": [len(t.encode("utf-8")) for t in texts]}

    meta = {"dataset": dataset, "tokenizer": {**tok.describe(), "file": tok_file}, "vocab_size": tok.vocab_size,
            "eot_token": tok.eot_token, "dtype": np.dtype(dtype).name, "splits": {}, "inputs": inputs}
    if instruct:
        meta["instruct"] = True  # train.py copies it into the checkpoint: sample.py knows the model takes a header
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
    lock_dir(data_dir, "prepare.py")  # creates a new data_dir (held already if it existed)
    try:
        with contextlib.ExitStack() as files:
            staged = [files.enter_context(atomic_file(os.path.join(data_dir, tok_file)))]
            staged[0].write(tok.spec["json" if tok.spec["kind"] == "bpe" else "ranks"])
            for name, ds in tokenized.items():
                staged.append(files.enter_context(atomic_file(os.path.join(data_dir, f"{name}.bin"), "wb")))
                n_tokens = write_split(ds, staged[-1], dtype, shards, f"writing {name}.bin", quiet)
                n_bytes = int(pc.sum(ds.with_format("arrow")[:]["n_bytes"]).as_py())
                meta["splits"][name] = {"documents": len(ds), "tokens": n_tokens, "bytes": n_bytes}
                print(f"{name}: {len(ds):,} documents, {n_tokens:,} tokens, {n_bytes:,} bytes "
                      f"({n_bytes / n_tokens:.2f} bytes/token)")
                if n_tokens < _SMALLEST_BATCH:
                    print(f"note: the {name} split has {n_tokens:,} tokens; train.py needs batch_size x block_size "
                          f"tokens in each split ({_SMALLEST_BATCH:,} for config/tinystories_cpu.py): add text, or "
                          f"train with a smaller --batch_size or --block_size")
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

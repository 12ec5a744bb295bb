"""Tokenizers: text <-> token ids, described by a plain dict (a "spec") so that a tokenizer travels inside
meta.json and checkpoints and can be rebuilt without the data directory.

Two kinds, both byte-level BPE (Sennrich et al. 2016, on bytes as in GPT-2):
- "tiktoken": GPT-2's vocabulary (tiktoken's gpt2 encoding, or a local .tiktoken ranks file);
- "bpe": a vocabulary trained on the corpus by prepare.py with Hugging Face `tokenizers` (a tokenizer.json).
"""

import base64
import hashlib
import math
import os

from configurator import read_text
from errors import UserError
from files import GiB, check_input_file, load_torch

TOKENIZER_LIMIT = 1 * GiB  # bytes: the largest vocabulary file read (a 1,000,000-id tokenizer.json is ~100 MB)

EOT = "<|endoftext|>"
PIECE_CHARS = 1 << 16   # the longest text handed to a tokenizer library at once, in characters (see cut_pieces)
BATCH_CHARS = 1 << 20   # characters encoded per library call: bounds the library's working memory


class Tokenizer:
    """Byte-level BPE (Sennrich et al. 2016, on bytes as in GPT-2): text <-> token ids.

    Built from a `spec` dict that holds everything needed to rebuild it, so a checkpoint that stores the spec
    decodes without the data directory. Two kinds:
        {"kind": "tiktoken", "name", "source": "gpt2" or the ranks file, "pat_str",
         "ranks": the mergeable ranks in .tiktoken format ("base64(token bytes) rank" per line), "sha256"}
            GPT-2's vocabulary through tiktoken; <|endoftext|> is the id after the last rank.
        {"kind": "bpe", "name", "source": "tokenizer.json" (in the data directory), "json": that file's text,
         "sha256"}
            a vocabulary trained on the corpus by prepare.py with Hugging Face `tokenizers`.
    "sha256" is the fingerprint of the vocabulary (of "ranks" or "json"). `eot_token` (<|endoftext|>) ends
    every document. Text is encoded without special tokens: a story containing the string "<|endoftext|>"
    gets ordinary tokens for it, and decode(encode(s)) == s for any str s.
    Raises UserError for a spec of unknown kind or one the libraries cannot build (e.g. a damaged checkpoint).
    """

    def __init__(self, spec):
        check_spec(spec)
        self.spec = spec
        try:
            if spec["kind"] == "tiktoken":
                import tiktoken
                ranks = parse_ranks(spec["ranks"])
                self.eot_token = len(ranks)
                enc = tiktoken.Encoding(spec["name"], pat_str=spec["pat_str"], mergeable_ranks=ranks,
                                        special_tokens={EOT: self.eot_token})
                self.vocab_size = enc.n_vocab
                self._encode_batch = enc.encode_ordinary_batch
                self._decode = enc.decode
            else:
                from tokenizers import Tokenizer as HFTokenizer
                hf = HFTokenizer.from_str(spec["json"])
                hf.encode_special_tokens = True  # "<|endoftext|>" typed in a story is text, not the separator
                self.eot_token = hf.token_to_id(EOT)
                self.vocab_size = hf.get_vocab_size()
                self._encode_batch = lambda texts: [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
                self._decode = lambda ids: hf.decode(ids, skip_special_tokens=False)
        except Exception as e:  # a damaged description from a checkpoint or meta.json: the libraries' own errors
            raise UserError(f"the {spec['kind']} tokenizer {spec['name']!r} cannot be built from its description "
                            f"(damaged?): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if self.eot_token is None:
            raise UserError(f"the tokenizer {spec['name']!r} has no {EOT} token")

    def __getstate__(self):  # pickled as its spec (datasets.map sends it to worker processes)
        return self.spec

    def __setstate__(self, spec):
        self.__init__(spec)

    def encode(self, text):
        """str -> list of token ids (int), without end-of-text (of any length: see encode_batch)."""
        return self.encode_batch([text])[0]

    def encode_prompt(self, text):
        """A prompt for generation -> list of token ids, at least one: an empty prompt is [eot_token], the start
        of a new document (what every story in the training data follows)."""
        return self.encode(text) or [self.eot_token]

    def encode_batch(self, texts, dtype=None):
        """list of str -> list of lists of token ids, encoded in parallel by the library's threads; with `dtype`
        (a numpy integer type), a list of 1-D numpy arrays of that type instead, 4 or 8 bytes per token rather
        than a Python int each.

        The libraries' working memory grows with the text of one call (about 280 bytes per character of one long
        line for `tokenizers`), so texts are cut into pieces of at most PIECE_CHARS characters (cut_pieces: the
        ids are the same as for the whole text) and encoded at most BATCH_CHARS characters per call: beyond the
        texts and their ids, memory is bounded by those constants, whatever the length of a document."""
        import numpy as np
        texts = list(texts)
        if sum(map(len, texts)) <= BATCH_CHARS and all(len(t) <= PIECE_CHARS for t in texts):
            out = self._encode_batch(texts)
            return out if dtype is None else [np.asarray(ids, dtype=dtype) for ids in out]
        parts = [[] for _ in texts]  # each text's ids, a numpy array per piece
        group, owners, size = [], [], 0

        def encode_group():
            for i, ids in zip(owners, self._encode_batch(group)):
                parts[i].append(np.asarray(ids, dtype=dtype or np.int64))

        for i, text in enumerate(texts):
            for piece in cut_pieces(text):
                if group and size + len(piece) > BATCH_CHARS:
                    encode_group()
                    group, owners, size = [], [], 0
                group.append(piece)
                owners.append(i)
                size += len(piece)
        encode_group()
        arrays = [np.concatenate(p) if p else np.zeros(0, dtype=dtype or np.int64) for p in parts]
        return arrays if dtype is not None else [a.tolist() for a in arrays]

    def decode(self, ids):
        """Token ids -> str. Ids that end inside a multi-byte character decode to U+FFFD."""
        return self._decode(list(ids))

    def describe(self):
        """The spec without its bulky content, for meta.json and logs."""
        return {k: v for k, v in self.spec.items() if k not in ("ranks", "json")}


def cut_pieces(text, size=None):
    """Cut `text` into consecutive pieces of at most `size` characters (default PIECE_CHARS) that join to `text`,
    for tokenizer libraries whose memory grows with the length of one text.

    Each cut is made before a space or newline that is followed by a character that is not whitespace. GPT-2's
    split pattern (used by both kinds of Tokenizer, and by BPE training) never joins the text on the two sides of
    such a place into one pre-token: a word takes at most one space before it, and a run of whitespace ends
    before its last character when a word follows. So the pre-tokens, and therefore the token ids and the pair
    counts of BPE training, are the same as for the whole text. A piece with no such place (a `size`-long run
    without spaces) is cut at `size` characters, where the ids may then differ from the whole text's.
    Returns a list of str."""
    size = PIECE_CHARS if size is None else size
    if len(text) <= size:
        return [text]
    pieces, start = [], 0
    while len(text) - start > size:
        end = cut = start + size
        while cut > start:
            cut = max(text.rfind(" ", start + 1, cut), text.rfind("\n", start + 1, cut))
            if cut <= start or not text[cut + 1].isspace():
                break
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class StreamDecoder:
    """Text of token ids that arrive a few at a time (a story being written), without ever showing half a
    character: a token may end in the middle of a multi-byte UTF-8 character (é, emoji, CJK), which decodes
    to U+FFFD until the token with its remaining bytes arrives.

        dec = StreamDecoder(tok)
        for t in ids: print(dec.push([t]), end="")
        print(dec.flush())      # the pieces joined == tok.decode(ids)

    push() decodes the ids since the last complete character and holds back trailing U+FFFD; once the text
    ends cleanly those ids are dropped, so each step decodes a token or two and a long story costs linear time.
    This relies on byte-level decoding, which both kinds of Tokenizer have: the text of ids a + b is the text of
    a followed by that of b whenever a's bytes end with a complete character. (transformers' TextStreamer also
    decodes its pending tokens again at each step and prints only the part that can no longer change.)
    """

    def __init__(self, tok):
        self.tok = tok
        self.ids = []    # ids whose text is not yet fully returned
        self.sent = ""   # what push() has already returned of decode(self.ids)

    def push(self, ids):
        """Add token ids (a list of int); return the new complete text (str, maybe empty)."""
        self.ids.extend(ids)
        text = self.tok.decode(self.ids)
        stable = text.rstrip("\ufffd")
        piece = stable[len(self.sent):]
        if len(stable) == len(text):  # nothing pending: start afresh from the next token
            self.ids, self.sent = [], ""
        else:
            self.sent = stable
        return piece

    def flush(self):
        """The text still held back (U+FFFD of bytes that never completed a character); then start afresh."""
        piece = self.tok.decode(self.ids)[len(self.sent):]
        self.ids, self.sent = [], ""
        return piece


_SPEC_FIELDS = {"tiktoken": ("name", "pat_str", "ranks", "sha256"), "bpe": ("name", "json", "sha256")}


def check_spec(spec):
    """Raise UserError unless `spec` has the form Tokenizer takes (a dict of a known kind whose fields are str):
    what a checkpoint or meta.json from elsewhere must hold before anything is built from it."""
    if not isinstance(spec, dict):
        raise UserError(f"the tokenizer is a {type(spec).__name__}, not a tokenizer description (a dict)")
    if spec.get("kind") not in _SPEC_FIELDS:
        raise UserError(f"unknown tokenizer kind {spec.get('kind')!r} (expected tiktoken or bpe)")
    bad = [k for k in _SPEC_FIELDS[spec["kind"]] if not isinstance(spec.get(k), str)]
    if bad:
        raise UserError(f"the {spec['kind']} tokenizer description lacks text fields {', '.join(bad)}")


def parse_ranks(text):
    """The mergeable ranks of a .tiktoken file's text ("base64(token bytes) rank" per line): dict bytes -> int."""
    ranks = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bpe_spec(json_text, source):
    """Spec of a Hugging Face tokenizer.json (see Tokenizer). Raises UserError if it has no <|endoftext|>."""
    from tokenizers import Tokenizer as HFTokenizer
    try:
        hf = HFTokenizer.from_str(json_text)
    except Exception as e:
        raise UserError(f"{source} is not a tokenizer.json file ({type(e).__name__}: {e})") from None
    if hf.token_to_id(EOT) is None:
        raise UserError(f"{source} has no {EOT} token; prepare.py needs it to separate documents")
    return {"kind": "bpe", "name": f"bpe-{hf.get_vocab_size()}", "source": source, "json": json_text,
            "sha256": hashlib.sha256(json_text.encode()).hexdigest()}


def _tiktoken_spec(name, source, ranks):
    from tiktoken_ext.openai_public import r50k_pat_str
    text = "".join(f"{base64.b64encode(token).decode()} {rank}\n"
                   for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{source}: token ranks are not 0..{len(ranks) - 1}; is this a .tiktoken ranks file?")
    return {"kind": "tiktoken", "name": name, "source": source, "pat_str": r50k_pat_str, "ranks": text,
            "sha256": hashlib.sha256(text.encode()).hexdigest()}


def load_tokenizer(name):
    """The tokenizer named on the command line.

    Args:
        name: "gpt2" for tiktoken's GPT-2 encoding (downloaded on first use, then cached), the path of a
            .tiktoken ranks file (loaded with GPT-2's split pattern and <|endoftext|> after the last rank), or
            the path of a Hugging Face tokenizer.json such as prepare.py --tokenizer=bpe writes, or the path of a
            checkpoint (.pt) from train.py, whose own tokenizer it returns: text for fine-tuning that model.
    Returns:
        Tokenizer.
    Raises:
        UserError: the file is missing, not a regular file (a folder, /dev/zero, a FIFO: files.check_input_file),
        larger than TOKENIZER_LIMIT bytes (a vocabulary file; a checkpoint may be any size), not UTF-8, not a
        ranks file, tokenizer.json or checkpoint, or the gpt2 download fails (e.g. offline).
    """
    if name == "gpt2":
        import tiktoken
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise UserError(f"could not load tiktoken's gpt2 encoding, which is downloaded on first use "
                            f"({type(e).__name__}); offline, pass --tokenizer=path/to/gpt2.tiktoken") from None
        ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.eot_token)}
        return Tokenizer(_tiktoken_spec("gpt2", "gpt2", ranks))
    if not os.path.lexists(name):
        raise UserError(f"tokenizer {name!r} not found: use gpt2, bpe (prepare.py trains one), or the path "
                        f"of a .tiktoken ranks file, a tokenizer.json or a checkpoint (.pt)")
    check_input_file(name, "the tokenizer file", None if name.endswith(".pt") else TOKENIZER_LIMIT)
    if name.endswith(".pt"):
        ckpt = load_torch(name)  # only its tokenizer is needed: the model's weights are not checked here
        if not isinstance(ckpt, dict) or "tokenizer" not in ckpt:
            raise UserError(f"{name} is not a checkpoint written by this project's train.py")
        return Tokenizer(ckpt["tokenizer"])
    if name.endswith(".json"):
        return Tokenizer(bpe_spec(read_text(name, "the tokenizer file", TOKENIZER_LIMIT), name))
    from tiktoken.load import load_tiktoken_bpe
    try:
        ranks = load_tiktoken_bpe(name)
    except Exception as e:
        raise UserError(f"{name} is not a .tiktoken ranks file ({type(e).__name__}: {e})") from None
    stem = os.path.splitext(os.path.basename(name))[0]
    return Tokenizer(_tiktoken_spec(stem, os.path.abspath(name), ranks))


def tokenizer_from_meta(meta, data_dir):
    """The tokenizer that prepare.py wrote into `data_dir` (meta["tokenizer"]["file"]), checked against the
    fingerprint in `meta` (a loaded meta.json). Returns Tokenizer.
    Raises UserError if the file is missing, not a regular file of at most TOKENIZER_LIMIT bytes, or has changed
    since the data was prepared."""
    desc = meta["tokenizer"]
    if "file" not in desc:
        raise UserError(f"{data_dir} was prepared by an older prepare.py: re-run it with --force")
    path = os.path.join(data_dir, desc["file"])
    if not os.path.lexists(path):
        raise UserError(f"{path} is missing: re-run prepare.py with --force")
    text = read_text(path, "the prepared data's tokenizer", TOKENIZER_LIMIT)
    if hashlib.sha256(text.encode()).hexdigest() != desc["sha256"]:
        raise UserError(f"{path} has changed since {data_dir} was prepared: re-run prepare.py with --force")
    return Tokenizer({**desc, "ranks" if desc["kind"] == "tiktoken" else "json": text})


def bits_per_byte(loss, tokens, n_bytes):
    """Convert a mean cross-entropy in nats per token into bits per UTF-8 byte of text:
    loss / ln 2 * tokens / bytes, with the token and byte counts of the same text (meta.json has them per split).
    Unlike loss per token it does not depend on how the tokenizer cuts the text, so runs with different
    vocabularies compare (the measure used for the Pile, Gao et al. 2020)."""
    return loss / math.log(2) * tokens / n_bytes

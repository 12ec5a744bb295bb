"""Tokenizers: exact round trips, a vocabulary trained on the sample, bits per byte, uint32 data, long documents
encoded and learned from in bounded pieces."""
import json
import math

import numpy as np
import pytest

from tokenizer import EOT, StreamDecoder, Tokenizer, bits_per_byte, bpe_spec, load_tokenizer
from prepare import train_bpe
from conftest import GPT2_RANKS, SAMPLE, STORIES, TINY, assert_user_error, run_script

TRICKY = [
    "Once upon a time, there was a café. 🙂🐶🦄 naïve Zoë — “quotes” ‘too’",
    "tabs\tand\t\ttabs, trailing spaces   \n\n\n\nand repeated newlines\r\n\u00a0nbsp",
    f"She wrote {EOT} in her story.{EOT}",
    "中文, русский, العربية, हिन्दी, emoji with skin tone 👋🏽 and ZWJ 👨‍👩‍👧",
    " leading space", "", "\n",
]


@pytest.fixture(scope="module")
def bpe():
    """A 512-id vocabulary trained on the shared sample's train split."""
    docs = [b for b in (SAMPLE / "train.txt").read_text(encoding="utf-8").split("\n\n") if b.strip()]
    return train_bpe(docs, 512)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(text, bpe):
    for tok in (bpe, load_tokenizer(str(GPT2_RANKS))):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.eot_token not in ids  # the literal string is text, never the document separator


@pytest.mark.parametrize("text", TRICKY)
def test_stream_decoder_never_shows_half_a_character(text, bpe):
    for tok in (bpe, load_tokenizer(str(GPT2_RANKS))):
        ids = tok.encode(text)
        if "🙂" in text or "中" in text:  # tokens end inside characters: a naive decode would print U+FFFD
            assert any("\ufffd" in tok.decode(ids[:i]) for i in range(len(ids)))
        dec = StreamDecoder(tok)
        pieces = [dec.push([t]) for t in ids] + [dec.flush()]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_keeps_bytes_that_never_complete_a_character(bpe):
    rng = np.random.default_rng(0)
    for tok in (bpe, load_tokenizer(str(GPT2_RANKS))):
        byte_ids = tok.encode("é🙂中")  # cut anywhere: a character's bytes never completed
        for _ in range(20):
            ids = rng.integers(0, tok.vocab_size - 1, 30).tolist() + byte_ids[:rng.integers(0, len(byte_ids))]
            dec = StreamDecoder(tok)
            chunks = np.split(ids, np.sort(rng.integers(0, len(ids), 5)))  # pieces of 0 or more ids
            assert "".join([dec.push(c.tolist()) for c in chunks] + [dec.flush()]) == tok.decode(ids)


def test_trained_vocabulary_on_the_sample(bpe):
    assert bpe.vocab_size == 512 and bpe.spec["kind"] == "bpe"
    assert bpe.decode([bpe.eot_token]) == EOT
    text = (SAMPLE / "validation.txt").read_text(encoding="utf-8")[:20000]
    assert len(text.encode()) / len(bpe.encode(text)) > 2.0  # 255 merges learned: well above 1 byte per token
    rebuilt = Tokenizer(json.loads(json.dumps(bpe.spec)))  # a spec survives JSON, as in meta.json / checkpoints
    assert rebuilt.encode(text) == bpe.encode(text)


def test_bits_per_byte_by_hand():
    # 2 bits per token (loss 2 ln 2 nats) over 100 tokens = 200 bits for 400 bytes = 0.5 bits per byte
    assert bits_per_byte(2 * math.log(2), tokens=100, n_bytes=400) == pytest.approx(0.5)
    assert bits_per_byte(math.log(2), tokens=4, n_bytes=1) == pytest.approx(4.0)


@pytest.mark.slow
def test_bpe_pipeline_end_to_end(tmp_path, hf_home):
    data = tmp_path / "bpe"
    run_script("prepare.py", f"--dataset={SAMPLE}", "--tokenizer=bpe", "--vocab_size=512", f"--data_dir={data}",
               env={"HF_HOME": str(hf_home)})
    meta = json.loads((data / "meta.json").read_text())
    assert meta["vocab_size"] == 512 and meta["tokenizer"]["file"] == "tokenizer.json"
    tok = Tokenizer(bpe_spec((data / "tokenizer.json").read_text(), "t"))
    assert meta["tokenizer"]["sha256"] == tok.spec["sha256"]
    assert np.fromfile(data / "validation.bin", dtype=np.uint16).size == meta["splits"]["validation"]["tokens"]

    out = tmp_path / "out"
    run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={out}", "--max_iters=40",
               "--eval_interval=20", "--lr_decay_iters=40")
    rows = [r.split(",") for r in (out / "log.csv").read_text().splitlines()]
    header, last = rows[0], dict(zip(rows[0], rows[-1]))
    assert "val_bpb" in header and "train_bpb" in header
    v = meta["splits"]["validation"]
    assert float(last["val_bpb"]) == pytest.approx(
        float(last["val_loss"]) / math.log(2) * v["tokens"] / v["bytes"], rel=1e-4)
    assert float(last["val_bpb"]) < float(dict(zip(header, rows[1]))["val_bpb"])

    (data / "tokenizer.json").unlink()  # the checkpoint carries the vocabulary
    proc = run_script("sample.py", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=20", "--device=cpu")
    assert proc.stdout.startswith("Once upon a time")


@pytest.mark.slow
def test_config_that_pins_a_vocabulary_refuses_other_data(sample_data, tmp_path):
    proc = run_script("train.py", "config/tinystories_1m_bpe.py", f"--data_dir={sample_data}",
                      f"--out_dir={tmp_path}", "--max_iters=1", check=False)
    has = json.loads((sample_data / "meta.json").read_text())["vocab_size"]
    assert_user_error(proc, "vocabulary of 4096 ids", f"has {has}",
                      "python prepare.py --tokenizer=bpe --vocab_size=4096")


@pytest.mark.slow
def test_vocabulary_over_65536_ids_is_stored_as_uint32(tmp_path, hf_home):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab[EOT] = len(vocab)
    vocab.update({f"unused{i}": len(vocab) + i for i in range(70000)})
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOT])
    (tmp_path / "big.json").write_text(hf.to_str())

    data = tmp_path / "big"
    run_script("prepare.py", f"--dataset={SAMPLE}/validation.txt", f"--tokenizer={tmp_path}/big.json",
               f"--data_dir={data}", "--val_fraction=0.2", env={"HF_HOME": str(hf_home)})
    meta = json.loads((data / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70257 and "uint32" in meta["dtype_note"]
    assert (data / "train.bin").stat().st_size == 4 * meta["splits"]["train"]["tokens"]
    proc = run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}/o", "--max_iters=2",
                      "--eval_interval=2", "--eval_iters=1")
    assert "iter 2:" in proc.stdout


def long_line(n_chars):
    """One line of story words of about n_chars characters, with runs of spaces, tabs and punctuation."""
    words = " ".join(STORIES).replace("play", "play  \t ").replace("ball.", "ball...  'Yes,'")
    return (words + " ") * (n_chars // len(words) + 1)


@pytest.mark.parametrize("size", [1, 7, 64])
def test_cut_pieces_rejoin_and_respect_the_size(size):
    from tokenizer import cut_pieces
    text = long_line(3000) + "x" * 200  # ends with a run that has no place to cut
    pieces = cut_pieces(text, size)
    assert "".join(pieces) == text and all(len(p) <= size for p in pieces)


def test_long_documents_encode_to_the_same_ids_in_pieces(monkeypatch, tiny_models):
    import tokenizer
    from conftest import GPT2_RANKS
    toks = [tiny_models[0]["tok"]] + ([tokenizer.load_tokenizer(str(GPT2_RANKS))] if GPT2_RANKS.exists() else [])
    texts = [long_line(20_000), "Once upon a time.", "", long_line(3_000)]
    for tok in toks:
        whole = tok._encode_batch(texts)  # the library's answer for the whole texts
        monkeypatch.setattr(tokenizer, "PIECE_CHARS", 100)
        monkeypatch.setattr(tokenizer, "BATCH_CHARS", 1000)
        assert tok.encode_batch(texts) == whole
        assert [a.tolist() for a in tok.encode_batch(texts, dtype=np.uint32)] == whole
        monkeypatch.undo()


def test_bpe_training_on_pieces_learns_the_same_vocabulary(monkeypatch):
    import tokenizer
    texts = [long_line(20_000), *STORIES]
    whole = train_bpe(texts, 400).spec["json"]
    monkeypatch.setattr(tokenizer, "PIECE_CHARS", 50)
    monkeypatch.setattr(tokenizer, "BATCH_CHARS", 500)
    assert train_bpe(texts, 400).spec["json"] == whole

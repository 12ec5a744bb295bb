"""eval.py: exact loss against brute force, story metrics on hand-made text, the judge against a local server
(and its deadline), --text read as prepare.py reads it, reports (never replacing another file) and --compare,
and bad inputs. A tiny random model on a tiny prepared directory: no training needed."""
import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLE, assert_user_error, run_script

import eval as ev
import judge
from configurator import UserError
from checkpoint import load_checkpoint, model_from_checkpoint
from files import save_torch
from model import GPT, GPTConfig
from prepare import read_meta
from tokenizer import Tokenizer, bits_per_byte

CPU = ["--device=cpu", "--dtype=float32"]


def tiny_gpt(vocab_size=50, block_size=8, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=16,
                         dropout=0.0, bias=True))


def documents(name, n):
    return [b for b in (SAMPLE / name).read_text(encoding="utf-8").split("\n\n") if b.strip()][:n]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A prepared data directory (300-id BPE trained on 100 sample stories; 6 validation stories, also as a
    .txt) and out/best_model_params.pt: an untrained GPT saved the way train.py saves it."""
    from prepare import train_bpe
    root = tmp_path_factory.mktemp("eval")
    data, out = root / "data", root / "out"
    data.mkdir()
    out.mkdir()
    train_docs, val_docs = documents("train.txt", 100), documents("validation.txt", 6)
    tok = train_bpe(train_docs, 300)
    (data / "tokenizer.json").write_text(tok.spec["json"], encoding="utf-8")
    meta = {"dataset": "test", "tokenizer": {**tok.describe(), "file": "tokenizer.json"},
            "vocab_size": tok.vocab_size, "eot_token": tok.eot_token, "dtype": "uint16", "splits": {}}
    for split, docs in (("train", train_docs), ("validation", val_docs)):
        ids = ev.encode_documents(tok, docs).astype(np.uint16)
        ids.tofile(data / f"{split}.bin")
        meta["splits"][split] = {"documents": len(docs), "tokens": int(ids.size),
                                 "bytes": sum(len(d.encode("utf-8")) for d in docs)}
    (data / "meta.json").write_text(json.dumps(meta))
    (root / "validation.txt").write_text("\n\n".join(val_docs), encoding="utf-8")
    args = {"vocab_size": 320, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0,
            "bias": True}
    torch.manual_seed(0)
    save_torch({"model": GPT(GPTConfig(**args)).state_dict(), "model_args": args, "tokenizer": tok.spec,
                     "config": {"data_dir": str(data)}, "iter_num": 7, "val_loss": 5.0},
                    out / "best_model_params.pt")
    return {"root": root, "data": data, "out": out, "tok": tok, "meta": meta, "train_docs": train_docs}


class Judge(BaseHTTPRequestHandler):
    """Chat-completions endpoints: /ok/v1 answers the next of REPLIES, /fail/v1 HTTP 500, /junk/v1 not JSON,
    /slow/v1 nothing for a second."""
    REPLIES: ClassVar = ['{"grammar": 8, "creativity": 6, "consistency": 7, "plot": 5}',
               'Here you go:\n```json\n{"Grammar": "9/10", "creativity": 7, "consistency": 8, "plot": 6}\n```',
               "I would rather not grade this story."]
    requests: ClassVar = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Judge.requests.append((self.path, dict(self.headers), body))
        if self.path.startswith("/slow/"):
            time.sleep(1.0)
            return
        if self.path.startswith("/fail/"):
            self.send_error(500, "model overloaded")
            return
        if self.path.startswith("/junk/"):
            answer = b"<html>not an API</html>"
        else:
            reply = Judge.REPLIES[(len(Judge.requests) - 1) % len(Judge.REPLIES)]
            answer = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------------------------------------------
# exact loss

def brute_force(model, tokens, block_size, overlap):
    """Sum of -log p(token j | its context) with one forward pass per token. Token j is scored by the first
    window k (start k * stride) that holds it as a target at an offset >= overlap (any offset in window 0)."""
    stride, total, starts = block_size - overlap, 0.0, []
    for j in range(1, len(tokens)):
        k = 0
        while not (j - 1 - k * stride < block_size and (k == 0 or j - 1 - k * stride >= overlap)):
            k += 1
        start = k * stride
        starts.append(start)
        logits, _ = model(torch.tensor(tokens[start:j])[None])
        total -= torch.log_softmax(logits[0, -1].double(), -1)[tokens[j]].item()
    return total, starts


@pytest.mark.parametrize("n", [2, 9, 10, 29])
def test_exact_loss_scores_every_token_once_like_brute_force(n):
    model = tiny_gpt().eval()
    tokens = np.random.default_rng(n).integers(0, 50, n).tolist()
    for overlap in (0, 3, 4, 7):
        res = ev.exact_loss(model, tokens, block_size=8, overlap=overlap, batch_size=3)
        expected, starts = brute_force(model, tokens, 8, overlap)
        assert res["tokens_scored"] == n - 1
        assert res["loss_sum"] == pytest.approx(expected, rel=1e-5)
        assert res["loss"] == pytest.approx(res["loss_sum"] / (n - 1))
        if overlap == 7:  # stride 1: a sliding window over the last 8 tokens
            assert starts == [max(0, j - 8) for j in range(1, n)]
        if overlap == 0:  # disjoint windows
            assert starts == [8 * ((j - 1) // 8) for j in range(1, n)]
        assert all(j - s >= min(j, overlap + 1) for j, s in zip(range(1, n), starts))  # the promised context


def test_exact_loss_does_not_depend_on_batch_size_and_reads_a_memmap(tmp_path):
    model = tiny_gpt(block_size=16)
    tokens = np.random.default_rng(0).integers(0, 40, 200).astype(np.uint16)
    tokens.tofile(tmp_path / "v.bin")
    stream = np.memmap(tmp_path / "v.bin", dtype=np.uint16, mode="r")
    results = [ev.exact_loss(model, stream, batch_size=b) for b in (1, 2, 7, 100)]
    assert {r["tokens_scored"] for r in results} == {199} and results[0]["overlap"] == 8
    assert all(r["loss_sum"] == pytest.approx(results[0]["loss_sum"], rel=1e-6) for r in results)
    assert model.training  # put back in training mode, as train.py will call it mid-run
    with pytest.raises(ValueError, match="overlap=16 must be 0..15"):
        ev.exact_loss(model, stream, overlap=16)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        ev.exact_loss(model, stream[:1])


def test_bits_per_byte_formula():
    assert bits_per_byte(math.log(2), 100, 50) == pytest.approx(2.0)  # 1 bit/token x 2 tokens/byte
    assert bits_per_byte(1.5, 1000, 4000) == pytest.approx(1.5 / math.log(2) / 4)


def test_text_documents_split_like_prepare(tmp_path):
    assert ev.text_documents(SAMPLE / "validation.txt") == documents("validation.txt", 10 ** 6)
    (tmp_path / "a.txt").write_text("One.\n\n \n\nTwo\nlines.\n\n\n\nThree.\n")
    assert ev.text_documents(tmp_path / "a.txt") == ["One.", "Two\nlines.", "Three.\n"]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    for name, message in (("latin1.txt", "is not UTF-8 text: the byte at offset 3 (b'\\xe9')"),
                          ("blank.txt", "holds no text"), ("none.txt", "none.txt (the --text file) does not exist")):
        with pytest.raises(UserError, match=re.escape(message)):
            ev.text_documents(tmp_path / name)


# --------------------------------------------------------------------------------------------------------------
# stories

def test_story_metrics_on_hand_made_text():
    assert ev.words("It\u2019s 3 o'clock: rock'n'roll, 'quoted' Caf\xe9_x") == [
        "it's", "o'clock", "rock'n'roll", "quoted", "caf\xe9", "x"]
    texts = ["The cat sat. The cat ran!", "Don't stop, Lily's dog 42 ran"]
    # words: the cat sat the cat ran | don't stop lily's dog ran
    m = ev.text_metrics(texts, vocab={"the", "cat", "sat", "ran", "dog", "stop"})
    assert m["words"] == 5.5
    assert m["distinct_1"] == pytest.approx(8 / 11)  # the cat sat ran don't stop lily's dog
    assert m["distinct_2"] == pytest.approx(8 / 9)   # (the, cat) twice; no bigram crosses the two samples
    assert m["distinct_3"] == 1.0
    assert m["longest_repeat"] == 1.0                # "the cat" (2) and nothing (0)
    assert m["oov"] == pytest.approx(2 / 11)         # don't, lily's
    assert ev.text_metrics(texts)["oov"] is None
    texts = ("", "a", "a b", "a a a a", "a b c a b c", "x a b y a b", "a b a b a")
    assert [ev.longest_repeat(s.split()) for s in texts] \
        == [0, 0, 0, 3, 3, 2, 3]  # occurrences may overlap: "a a a" at 0 and 1, "a b a" at 0 and 2
    assert ev.distinct_n([["a"]], 2) is None


def test_story_counts_stop_at_end_of_text(run_dir):
    tok = run_dir["tok"]
    eot, a, b = tok.eot_token, *tok.encode("ab")[:1], *tok.encode(" cat")[:1]

    class Stub(torch.nn.Module):  # continues row 0 with a, b, <eot>, <eot> and row 1 with b, b, b, b
        def generate(self, idx, max_new_tokens, **kw):
            assert kw["eos_token"] == eot and kw["vocab_limit"] == tok.vocab_size and max_new_tokens == 4
            new = torch.tensor([[a, b, eot, eot], [b, b, b, b]])[:idx.size(0)]
            return torch.cat([idx, new], dim=1)

    samples = ev.generate_samples(Stub(), tok, ["Once", "Then"], 3, 4, 1.0, 0, 1.0, 0, "cpu")
    assert [s["prompt"] for s in samples] == ["Once", "Then", "Once"]
    assert [(s["tokens"], s["ended"]) for s in samples] == [(2, True), (2, True), (4, False)]
    assert samples[0]["text"] == tok.decode([a, b])
    m = ev.story_metrics(samples)
    assert m["num_samples"] == 3 and m["tokens"] == pytest.approx(8 / 3) and m["ended"] == pytest.approx(2 / 3)


def test_sampling_is_deterministic_for_a_seed(run_dir):
    ckpt = load_checkpoint(str(run_dir["out"] / "best_model_params.pt"))
    model, tok = model_from_checkpoint(ckpt), Tokenizer(ckpt["tokenizer"])

    def draw(seed):
        return ev.generate_samples(model, tok, ev.PROMPTS, 4, 10, 1.0, 0, 1.0, seed, "cpu")

    first, again, other = draw(1), draw(1), draw(2)
    assert first == again and first != other
    assert ev.story_metrics(first) == ev.story_metrics(again)
    assert all(s["tokens"] == 10 or s["ended"] for s in first)


def test_train_vocabulary_reads_whole_documents(run_dir):
    data, meta = run_dir["data"], run_dir["meta"]
    everything = set(ev.words("\n".join(run_dir["train_docs"])))
    vocab, read = ev.train_vocabulary(data, meta, 0)
    assert vocab == everything and read == meta["splits"]["train"]["tokens"]
    assert ev.train_vocabulary(data, meta, 0, step=37)[0] == everything  # documents across read steps
    some, read = ev.train_vocabulary(data, meta, 8000, pieces=4)
    assert 0 < read <= 8000 and some < everything  # no fragments of cut-off documents


# --------------------------------------------------------------------------------------------------------------
# judge

def test_parse_grades():
    assert judge.parse_grades('{"grammar": 8, "creativity": 6, "consistency": 7, "plot": 5}') == \
        {"grammar": 8, "creativity": 6, "consistency": 7, "plot": 5}
    assert judge.parse_grades("Grammar: 8/10\nCreativity: 7/10\nConsistency: 6/10\nPlot: 5/10")["plot"] == 5
    for bad in ('{"grammar": 11, "creativity": 6, "consistency": 7, "plot": 5}',
                '{"grammar": 8, "creativity": 6, "consistency": 7}',
                '{"grammar": true, "creativity": 6, "consistency": 7, "plot": 5}', "eight out of ten", ""):
        assert judge.parse_grades(bad) is None


def test_judge_means_from_a_local_chat_completions_server(judge_server):
    Judge.requests.clear()
    samples = [{"prompt": "Once upon a time", "text": f" story {i}.", "tokens": 3, "ended": True} for i in range(3)]
    res = judge.judge_samples(samples, judge_server + "/ok/v1/", "tiny-judge", api_key="sk-test", timeout=10)
    assert res == {"grammar": 8.5, "creativity": 6.5, "consistency": 7.5, "plot": 5.5, "graded": 2,
                   "unparseable": 1, "model": "tiny-judge"}
    assert samples[1]["grades"]["grammar"] == 9 and samples[2]["grades"] is None
    path, headers, body = Judge.requests[0]
    assert path == "/ok/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "tiny-judge" and body["temperature"] == 0
    assert "Once upon a time*** story 0." in body["messages"][-1]["content"]
    Judge.requests.clear()
    Judge.requests.extend([None, None])  # the next answer is the unparseable one
    with pytest.raises(UserError, match="none of the 1 answers .* 'I would rather not"):
        judge.judge_samples(samples[:1], judge_server + "/ok/v1", "tiny-judge")
    with pytest.raises(UserError, match="did not answer in chat-completions format"):
        judge.judge_samples(samples[:1], judge_server + "/junk/v1", "tiny-judge")
    with pytest.raises(UserError, match=f"the judge at {judge_server}/slow/v1/chat/completions did not answer "
                                        f"within 0.2 s"):
        judge.judge_samples(samples[:1], judge_server + "/slow/v1", "tiny-judge", timeout=0.2)


# --------------------------------------------------------------------------------------------------------------
# the command line

@pytest.mark.slow
def test_cli_report_text_file_and_compare(run_dir, judge_server):
    out, data, meta = run_dir["out"], run_dir["data"], run_dir["meta"]
    proc = run_script("eval.py", f"--out_dir={out}", *CPU, "--num_samples=3", "--max_new_tokens=12",
                      f"--judge_url={judge_server}/ok/v1", "--judge_model=tiny-judge", "--batch_size=4")
    rep = json.loads((out / "eval.json").read_text())
    loss, val = rep["loss"], meta["splits"]["validation"]
    assert loss["tokens_scored"] == val["tokens"] - 1 and (loss["tokens"], loss["bytes"]) == (val["tokens"],
                                                                                              val["bytes"])
    assert (loss["block_size"], loss["overlap"]) == (32, 16) and not loss["partial"]
    assert loss["nats_per_token"] == pytest.approx(loss["loss_sum"] / loss["tokens_scored"])
    assert loss["perplexity"] == pytest.approx(math.exp(loss["nats_per_token"]))
    assert loss["bits_per_byte"] == pytest.approx(loss["nats_per_token"] / math.log(2) * val["tokens"] / val["bytes"])
    # the same numbers as a direct call on validation.bin, with the model eval.py scores with (fast.speed_up's)
    from fast import speed_up
    model = speed_up(model_from_checkpoint(load_checkpoint(str(out / "best_model_params.pt"))))
    direct = ev.exact_loss(model, np.fromfile(data / "validation.bin", dtype=np.uint16), 32, 16, 4)
    assert loss["loss_sum"] == pytest.approx(direct["loss_sum"], rel=1e-9)
    stories = rep["stories"]
    assert stories["num_samples"] == len(rep["samples"]) == 3 and 0 <= stories["oov"] <= 1
    assert stories["train_tokens_read"] == meta["splits"]["train"]["tokens"]
    assert rep["judge"]["graded"] + rep["judge"]["unparseable"] == 3 and rep["model"]["iter_num"] == 7
    assert f"{loss['bits_per_byte']:.4f}" in proc.stdout and (out / "eval.md").read_text().startswith("# Evaluation")

    # --text on the validation stories: same documents, same tokens, same loss and bits per byte
    run_script("eval.py", f"--out_dir={out}", *CPU, "--num_samples=0", f"--text={run_dir['root']}/validation.txt",
               f"--report={run_dir['root']}/text.json")
    text = json.loads((run_dir["root"] / "text.json").read_text())["loss"]
    assert (text["tokens"], text["bytes"], text["documents"]) == (val["tokens"], val["bytes"], val["documents"])
    assert text["nats_per_token"] == pytest.approx(loss["nats_per_token"], rel=1e-6)  # float32 batch means
    assert text["bits_per_byte"] == pytest.approx(loss["bits_per_byte"], rel=1e-6)
    assert (run_dir["root"] / "text.md").exists()

    bogus = run_dir["root"] / "bogus.json"
    bogus.write_text('{"loss": 1}')
    proc = run_script("eval.py", f"--compare={out}/eval.json,{run_dir['root']}/text.json")
    lines = proc.stdout.splitlines()
    assert lines[0] == f"| | {out}/eval.json | {run_dir['root']}/text.json |"
    assert f"| bits per byte | {loss['bits_per_byte']:.4f} | {text['bits_per_byte']:.4f} |" in lines
    assert any(line.startswith("| judge grammar (1-10) | 8.50 | - |") for line in lines)
    with pytest.raises(UserError, match="is not a report written by eval.py"):
        ev.compare_reports([str(bogus)])
    with pytest.raises(UserError, match=r"none.json \(the report\) does not exist"):
        ev.compare_reports([str(run_dir["root"] / "none.json")])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["closed_port", "http_500", "no_checkpoint"])
def test_cli_bad_input(case, run_dir, judge_server, tmp_path):
    out = run_dir["out"]
    if case == "no_checkpoint":
        args, fragments = [f"--out_dir={tmp_path}", *CPU], ["no checkpoint at", "python train.py"]
    else:
        if case == "closed_port":
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
            fragments = [f"cannot reach the judge at {url}/chat/completions", "refused"]
        else:
            url = f"{judge_server}/fail/v1"
            fragments = [f"the judge at {url}/chat/completions answered HTTP 500"]
        args = [f"--out_dir={out}", *CPU, "--num_samples=1", "--max_new_tokens=2", f"--judge_url={url}",
                "--judge_model=m", f"--report={tmp_path}/r.json"]
    proc = run_script("eval.py", *args, check=False)
    assert_user_error(proc, *fragments)
    assert list(tmp_path.iterdir()) == []  # no report written


def test_prepared_data_problems_name_the_fix(run_dir, tmp_path):
    meta, problems = read_meta(run_dir["data"], required=())
    assert meta == run_dir["meta"] and problems == {"train": "", "validation": ""}
    assert read_meta(tmp_path, required=()) == (None, {})
    (tmp_path / "meta.json").write_text(json.dumps(run_dir["meta"]))
    (tmp_path / "train.bin").write_bytes(b"12345")
    _, problems = read_meta(tmp_path, required=())
    assert "train.bin does not match meta.json: re-run prepare.py with --force" in problems["train"]
    assert "validation.bin is missing: run `python prepare.py --data_dir=" in problems["validation"]
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(UserError, match="meta.json is damaged"):
        read_meta(tmp_path, required=())


@pytest.mark.slow
def test_train_final_eval_scores_every_validation_token(run_dir, tmp_path):
    from conftest import TINY
    out = tmp_path / "run"
    proc = run_script("train.py", *TINY, f"--data_dir={run_dir['data']}", f"--out_dir={out}", "--max_iters=6",
                      "--eval_interval=3", "--final_eval=True")
    final = json.loads((out / "final_eval.json").read_text())
    val = run_dir["meta"]["splits"]["validation"]
    assert final["tokens_scored"] == val["tokens"] - 1 and final["overlap"] == 16
    assert f"{final['bits_per_byte']:.4f} bits per byte" in proc.stdout
    # the same number as eval.py's function on the best weights
    model = model_from_checkpoint(load_checkpoint(str(out / "best_model_params.pt")))
    direct = ev.exact_loss(model, np.fromfile(run_dir["data"] / "validation.bin", dtype=np.uint16), 32, 16, 8)
    assert final["nats_per_token"] == pytest.approx(direct["loss"], rel=1e-6)
    assert final["bits_per_byte"] == pytest.approx(bits_per_byte(direct["loss"], val["tokens"], val["bytes"]))


class _Trickle(BaseHTTPRequestHandler):
    def do_POST(self):  # answers one byte at a time, each well within a per-read timeout
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass

    def log_message(self, *args):
        pass


def test_judge_timeout_is_a_total_deadline_per_request():
    import judge
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # with a timeout per read, the 1,000 bytes would arrive (in 50 s) and fail to parse instead
        with pytest.raises(UserError, match="did not answer within 0.5 s"):
            judge.chat(f"http://127.0.0.1:{server.server_port}/v1", "m", [], timeout=0.5)
    finally:
        server.shutdown()


def test_eval_text_uses_prepares_document_rule(tmp_path):
    import eval as ev
    import prepare
    v2 = tmp_path / "valid.txt"  # TinyStoriesV2's layout: <|endoftext|> lines, blank lines inside stories
    v2.write_text("Tom ran.\n\nHe fell.\n<|endoftext|>\nSue sang.\n<|endoftext|>\n\n<|endoftext|>\n", encoding="utf-8")
    assert ev.text_documents(str(v2)) == ["Tom ran.\n\nHe fell.", "Sue sang."]
    plain = tmp_path / "plain.txt"
    plain.write_text("Tom ran.\nHe fell.\n\n\n  \n\nSue sang.\n", encoding="utf-8")
    assert ev.text_documents(str(plain)) == ["Tom ran.\nHe fell.", "Sue sang.\n"] == list(
        prepare.text_documents(str(plain)))
    only_eot = tmp_path / "eot.txt"
    only_eot.write_text("<|endoftext|>\n\n<|endoftext|>\n", encoding="utf-8")
    with pytest.raises(UserError, match="holds no text, only <|endoftext|> lines"):
        ev.text_documents(str(only_eot))
    with pytest.raises(UserError, match="is a directory, not a regular file"):
        ev.text_documents(str(tmp_path))


def test_eval_text_of_the_v2_file_has_the_prepared_documents():
    from conftest import SHARED
    import eval as ev
    path = SHARED / "data" / "tinystories-formats" / "TinyStoriesV2-GPT4-valid.txt"
    if not path.exists():
        pytest.skip(f"needs {path}: TinyStories' published files in ../shared/data/tinystories-formats/")
    docs = ev.text_documents(str(path))
    runs = [r for r in path.read_text(encoding="utf-8").split("<|endoftext|>") if r.strip()]
    assert len(docs) == len(runs) and not any("<|endoftext|>" in d for d in docs)


def test_eval_report_never_replaces_a_file_that_is_not_a_report(tmp_path):
    import eval as ev
    ckpt = tmp_path / "best_model_params.pt"
    ckpt.write_bytes(b"PK\x03\x04 a checkpoint")
    with pytest.raises(UserError, match="exists and is not a report written by eval.py"):
        ev.check_writable(str(ckpt), str(ckpt) + ".md")
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    with pytest.raises(UserError, match="notes.md exists and is not a report"):
        ev.check_writable(str(tmp_path / "notes.json"), str(notes))
    with pytest.raises(UserError, match="is a folder"):
        ev.check_writable(str(tmp_path), str(tmp_path) + ".md")
    report = tmp_path / "eval.json"  # an earlier report and its summary may be replaced
    report.write_text(json.dumps({"kind": ev._REPORT_KIND, "checkpoint": "x"}))
    (tmp_path / "eval.md").write_text(ev.markdown_report({"checkpoint": "x"}))
    ev.check_writable(str(report), str(tmp_path / "eval.md"))
    assert ckpt.read_bytes() == b"PK\x03\x04 a checkpoint" and notes.read_text() == "my notes\n"


# --------------------------------------------------------------------------------------------------------------
# files as editors write them, files that are not files, reports edited by hand, output to a file

BOM = b"\xef\xbb\xbf"  # what Windows editors write first in a UTF-8 file


def test_a_byte_order_mark_is_not_text(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_bytes(BOM + "Tom ran.\r\n\r\nSue sang.\r\n".encode())
    assert ev.text_documents(str(path)) == ["Tom ran.", "Sue sang.\n"]  # the first story does not start with U+FEFF
    rows = [{"story": "s", "instruction": {"words": ["dog", "ball"], "features": ["Dialogue"]}, "summary": "A dog."}]
    path = tmp_path / "instructions.json"
    path.write_bytes(BOM + json.dumps(rows).encode())
    assert ev.read_instructions(str(path), 5) == [{"words": ["dog", "ball"], "features": ["Dialogue"],
                                                   "summary": "A dog."}]
    report = tmp_path / "eval.json"
    report.write_bytes(BOM + json.dumps({"kind": ev._REPORT_KIND, "checkpoint": "x"}).encode())
    assert ev.load_report(str(report))["checkpoint"] == "x"


def test_a_fifo_at_the_report_path_is_not_opened(tmp_path):
    import os
    fifo = tmp_path / "eval.json"
    os.mkfifo(fifo)
    errors = []

    def check():
        try:
            ev.check_writable(str(fifo), str(tmp_path / "eval.md"))
        except UserError as e:
            errors.append(str(e))

    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    thread.join(60)  # a deadline, not a measurement: opening the FIFO would wait for a writer forever
    if thread.is_alive():  # let the blocked open go, so the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not thread.is_alive(), "check_writable blocked opening a FIFO"
    assert errors and "eval.json exists and is not a report written by eval.py" in errors[0]


def report_with(section, key, value):
    """A minimal report of eval.py with one field replaced (section None: a top-level field)."""
    rep = {"kind": ev._REPORT_KIND, "version": 1, "checkpoint": "out/best_model_params.pt",
           "model": {"iter_num": 7, "params": 1000, "tokenizer": "bpe-300"},
           "loss": {"source": "validation.bin", "tokens_scored": 99, "block_size": 32, "overlap": 16,
                    "nats_per_token": 2.5, "perplexity": 12.18, "bits_per_byte": 1.1, "partial": False},
           "stories": {"num_samples": 2, "tokens": 10.0, "words": 8.0, "ended": 0.5, "distinct_1": 0.9,
                       "distinct_2": 0.95, "distinct_3": 1.0, "longest_repeat": 1.0, "oov": None},
           "judge": {"grammar": 8.0, "creativity": 6.0, "consistency": 7.0, "plot": 5.0, "graded": 2,
                     "unparseable": 0, "model": "m"}}
    (rep if section is None else rep[section])[key] = value
    return rep


@pytest.mark.parametrize("section,key,value,field,held", [
    ("loss", "nats_per_token", "2.5", "loss.nats_per_token", "str '2.5', not a number"),
    ("loss", "perplexity", [1, 2], "loss.perplexity", "list [1, 2], not a number"),
    ("loss", "source", 5, "loss.source", "int 5, not text"),
    ("stories", "ended", True, "stories.ended", "bool True, not a number"),
    ("model", "iter_num", 7.5, "model.iter_num", "float 7.5, not a whole number"),
    ("judge", "graded", "2", "judge.graded", "str '2', not a whole number"),
    (None, "loss", [2.5], "loss", "list [2.5], not an object"),
])
def test_compare_names_the_report_and_the_field_of_a_wrong_type(tmp_path, section, key, value, field, held):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(report_with("loss", "nats_per_token", 2.5)))
    bad.write_text(json.dumps(report_with(section, key, value)))
    assert "| loss (nats/token) | 2.5000 |" in ev.compare_reports([str(good)])
    with pytest.raises(UserError) as info:
        ev.compare_reports([str(good), str(bad)])
    assert str(info.value) == (f"{bad} is damaged or was edited: its field {field} holds {held}; write it again "
                               f"with eval.py")


@pytest.mark.slow  # eval.py as a subprocess
def test_compare_of_a_tampered_report_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(report_with("loss", "bits_per_byte", {"x": 1})))
    proc = run_script("eval.py", f"--compare={bad}", check=False)
    assert_user_error(proc, str(bad), "its field loss.bits_per_byte holds dict {'x': 1}, not a number")


@pytest.mark.slow  # eval.py as a subprocess
def test_no_progress_lines_when_the_output_is_not_a_terminal(run_dir, tmp_path):
    # a clock that moves 11 s at each reading, so that a display of "a line every 10 s" would print at every batch
    # of windows; stderr is a file here (run_script captures it), where such lines are noise
    wrapper = tmp_path / "eval_with_a_fast_clock.py"
    wrapper.write_text(
        "import runpy, sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "now = [time.time()]\n"
        "def clock():\n"
        "    now[0] += 11\n"
        "    return now[0]\n"
        "time.time = clock\n"
        f"runpy.run_path({str(ROOT / 'eval.py')!r}, run_name='__main__')\n")
    proc = run_script(wrapper, f"--out_dir={run_dir['out']}", *CPU, "--num_samples=0", "--batch_size=1",
                      f"--report={tmp_path}/r.json")
    windows = json.loads((tmp_path / "r.json").read_text())["loss"]["windows"]
    assert windows > 10  # enough batches that the display would have shown
    assert "windows" not in proc.stderr, proc.stderr

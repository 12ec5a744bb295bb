"""Round three of odd inputs and hostile clients (issue 21): serve.py on a shared machine, text read the way
prepare.py reads it, nothing clobbered, one clear line for each mistake.

The server tests run serve.py's server in this process on 127.0.0.1 with a tiny untrained model, with few
connections and short timeouts, so they need no subprocess.
"""
import json
import os
import re
import socket
import sys
import threading
import time

import numpy as np
import pytest
import torch

from configurator import UserError
from model import GPT, GPTConfig
from prepare import train_bpe
from conftest import assert_user_error, run_script

import serve

STORIES = ["Once upon a time there was a cat. The cat liked to play in the sun.",
           "Tom had a red ball. He threw it to his dog, and the dog ran after it."] * 20


@pytest.fixture(scope="module")
def tiny_models():
    """serve.py's model list with one untrained 2-layer GPT and a 300-id vocabulary trained on a few lines."""
    tok = train_bpe(STORIES, 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=16, dropout=0.0)).eval()
    return [{"name": "tiny", "model": model, "tok": tok, "device": "cpu", "lock": threading.Lock(), "about": "x"}]


def start(models, host="127.0.0.1", **kwargs):
    server = serve.make_server(host, 0, models, "<html>the page</html>", **kwargs)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server(tiny_models):
    s = start(tiny_models, max_connections=4, timeout=2.0)
    yield s
    s.shutdown()
    s.server_close()


def request(server, path, headers=(), host="127.0.0.1"):
    """(status, body) of a raw HTTP/1.1 GET with exactly the given headers (a list of "Name: value")."""
    with socket.create_connection((host, server.server_address[1]), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\n{''.join(h + chr(13) + chr(10) for h in headers)}"
                  f"Connection: close\r\n\r\n".encode())
        reply = s.makefile("rb").read().decode()
    head, _, body = reply.partition("\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("host_header", ["127.0.0.1", "127.0.0.1:8000", "localhost", "LOCALHOST:1", "localhost.:80",
                                         "[::1]", "[::1]:8000", "10.1.2.3:8000"])
def test_own_names_are_served(server, host_header):
    status, body = request(server, "/", [f"Host: {host_header}"])
    assert status == 200 and body == "<html>the page</html>"


@pytest.mark.parametrize("path", ["/", "/generate?max_new_tokens=1", "/nothing"])
@pytest.mark.parametrize("host_header", ["attacker.example:8000", "attacker.example", "localhost.attacker.example",
                                         "127.0.0.1.nip.io:8000", ""])
def test_a_foreign_host_gets_403_with_the_reason(server, path, host_header):
    status, body = request(server, path, [f"Host: {host_header}"])
    assert status == 403 and "does not answer to the name" in json.loads(body)["error"]


def test_the_host_that_serve_listens_on_is_its_name_too():
    names = serve.own_names("storybox.local")
    assert serve.is_own_name("storybox.local", names) and not serve.is_own_name("evil.local", names)
    assert socket.gethostname().lower() in serve.own_names("0.0.0.0")


@pytest.mark.parametrize("headers", [["Origin: http://attacker.example"], ["Origin: http://127.0.0.1:1"],
                                     ["Origin: https://127.0.0.1:{port}"], ["Origin: null"],
                                     ["Sec-Fetch-Site: cross-site"], ["Sec-Fetch-Site: same-site"]])
def test_generate_refuses_other_pages(server, headers):
    port = server.server_address[1]
    status, body = request(server, "/generate?max_new_tokens=1",
                           [f"Host: 127.0.0.1:{port}", *(h.format(port=port) for h in headers)])
    assert status == 403 and "answers only this server's own page" in json.loads(body)["error"]


def test_generate_answers_its_own_page(server):
    port = server.server_address[1]
    for headers in ([f"Origin: http://127.0.0.1:{port}", "Sec-Fetch-Site: same-origin"],
                    [f"Origin: http://localhost:{port}"], ["Sec-Fetch-Site: none"], []):
        host = "localhost" if "localhost" in "".join(headers) else "127.0.0.1"
        status, body = request(server, "/generate?max_new_tokens=2", [f"Host: {host}:{port}", *headers])
        assert status == 200 and '"done": true' in body, (headers, body)


def test_idle_connections_cannot_hold_threads(tiny_models):
    """4 slots, 2 s timeout: 12 silent clients get at most 4 threads; the others are answered 503 at once, and
    the silent ones are disconnected after the timeout, so a real request is served again."""
    before = threading.active_count()
    server = start(tiny_models, max_connections=4, timeout=2.0)
    try:
        idle = [socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) for _ in range(12)]
        busy = [s.recv(4096) for s in idle[4:]]  # the accepting thread handles connections in order
        assert all(b.startswith(b"HTTP/1.0 503") and b"max_connections" in b for b in busy)
        assert threading.active_count() <= before + 1 + 4  # the serving thread and one per slot
        assert all(s.recv(4096) == b"" for s in idle[:4])  # disconnected after 2 s of silence (408 is not sent)
        for s in idle:
            s.close()
        deadline = time.monotonic() + 30  # the slots are released as the handler threads end
        while (status := request(server, "/", ["Host: localhost"])[0]) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200
    finally:
        server.shutdown()
        server.server_close()


def test_a_client_that_resets_the_connection_leaves_no_traceback(server, capsys):
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", server.server_address[1]))
        s.sendall(b"GET /generate?max_new_tokens=200 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close with a reset (RST)
        s.close()
    assert request(server, "/", ["Host: localhost"])[0] == 200
    try:
        raise ConnectionResetError(104, "Connection reset by peer")
    except ConnectionResetError:
        server.handle_error(None, ("127.0.0.1", 1))  # what socketserver calls with the error being handled
    assert "Traceback" not in capsys.readouterr().err


def test_ipv6_loopback(tiny_models):
    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6")
    try:
        server = start(tiny_models, host="::1")
    except Exception as e:  # a machine (container) whose loopback has no ::1
        pytest.skip(f"no IPv6 loopback here: {e}")
    try:
        assert server.loopback and request(server, "/", ["Host: [::1]"], host="::1")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_listen_errors_are_one_line(tiny_models):
    with pytest.raises(UserError, match="not an address or a name this machine can resolve"):
        serve.make_server("no-such-host.invalid", 0, tiny_models, "")
    with pytest.raises(UserError, match="not an address of this machine"):
        serve.make_server("192.0.2.1", 0, tiny_models, "")  # TEST-NET-1: never this machine's
    s = serve.make_server("127.0.0.1", 0, tiny_models, "")
    try:
        with pytest.raises(UserError, match="is another server running there"):
            serve.make_server("127.0.0.1", s.server_address[1], tiny_models, "")
    finally:
        s.server_close()


@pytest.mark.parametrize("address,loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                              ("0.0.0.0", False), ("::", False), ("192.168.1.5", False),
                                              ("fe80::1%lo", False)])
def test_which_addresses_get_the_open_to_the_network_warning(address, loopback):
    assert serve.is_loopback(address) is loopback  # main warns when False; no test listens beyond 127.0.0.1


@pytest.mark.slow
@pytest.mark.parametrize("out_dir,message", [("{d},", "has an empty entry"), ("{f}", "is a file, not a folder")])
def test_serve_out_dir_entries_are_checked(tmp_path, out_dir, message):
    (tmp_path / "file").write_text("x")
    proc = run_script("serve.py", "--out_dir=" + out_dir.format(d=tmp_path, f=tmp_path / "file"), "--port=0",
                      "--device=cpu", check=False)
    assert_user_error(proc, message)


# --------------------------------------------------------------------------------------------------------------
# Text read the way prepare.py reads it, and long documents in bounded pieces

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
    with pytest.raises(UserError, match="is not a file"):
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


# --------------------------------------------------------------------------------------------------------------
# Nothing clobbered, odd inputs

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


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45, 1e-37])
def test_a_vanishing_temperature_samples_greedily(temperature):
    from model import sample_next
    torch.manual_seed(0)
    logits = torch.randn(8, 300) * 5 - 40  # all negative: a shift-free division would give -inf everywhere
    greedy = logits.argmax(dim=-1)
    assert torch.equal(sample_next(logits, temperature), greedy)
    assert torch.equal(sample_next(logits, temperature, top_k=5, top_p=0.5), greedy)


def test_generation_at_a_vanishing_temperature_is_greedy(tiny_models):
    model = tiny_models[0]["model"]
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(model.generate(idx, 12, temperature=1e-300), model.generate(idx, 12, temperature=0))


def test_a_refused_pickle_does_not_suggest_weights_only_false(tmp_path):
    from checkpoint import load_checkpoint

    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))

    torch.save({"model": Evil(), "model_args": {}, "tokenizer": {}}, tmp_path / "evil.pt")
    with pytest.raises(UserError) as e:
        load_checkpoint(str(tmp_path / "evil.pt"))
    assert "could run code" in str(e.value) and "weights_only" not in str(e.value)


def tiny_checkpoint(tok, **changes):
    args = {"vocab_size": 320, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.0}
    torch.manual_seed(0)
    ckpt = {"model": GPT(GPTConfig(**args)).state_dict(), "model_args": dict(args), "tokenizer": tok.spec,
            "config": {}, "iter_num": 0}
    ckpt.update(changes)
    return ckpt


@pytest.mark.parametrize("change,message", [
    ({"model": [1, 2]}, "the 'model' entry) are a list, not a dict of tensors"),
    ({"model": {"x": 1}}, "hold entries that are not tensors: x"),
    ({"model_args": {"vocab_size": 320, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 16, "dropout": 0.0}},
     "missing transformer.h.1"),
    ({"model_args": {"vocab_size": 640, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.0}},
     "transformer.wte.weight is (320, 16), not (640, 16)"),
])
def test_checkpoints_are_checked_key_by_key_before_use(tmp_path, tiny_models, change, message):
    from checkpoint import load_checkpoint
    from files import save_torch as save_checkpoint
    save_checkpoint(tiny_checkpoint(tiny_models[0]["tok"], **change), tmp_path / "x.pt")
    with pytest.raises(UserError, match=re.escape(message)):
        load_checkpoint(str(tmp_path / "x.pt"))


def test_a_model_too_large_for_memory_is_refused_before_allocating():
    from checkpoint import check_fits
    huge = {"vocab_size": 50304, "block_size": 1024, "n_layer": 400, "n_head": 64, "n_embd": 16384}
    with pytest.raises(UserError, match=r"this model has [\d,]+M parameters: its weights need about [\d,.]+ GB"):
        check_fits(huge, "cpu")  # 1.3e12 parameters, 5 TB: no machine running these tests has that free
    check_fits({**huge, "n_layer": 1, "n_embd": 64, "n_head": 2}, "cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """In-process `datasets` calls cache into a private folder."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.mark.parametrize("files,message", [
    ({"train.txt": "<|endoftext|>\n<|endoftext|>\n\n<|endoftext|>\n"},
     "train.txt (the train split) holds no documents, only <|endoftext|> lines and whitespace"),
    ({"train.jsonl": '{"text": "A story."}\n{"text": "Another."}\n{"text": "cut off\n{"text": "Last."}\n'},
     "train.jsonl line 3: not valid JSON"),
    ({"train.jsonl": '{"text": "A story."}\n["a list"]\n'}, "train.jsonl line 2: a JSON list, not an object"),
    ({"train.json": '[{"text": "A story."},\n {"text": "Another."\n]\n'}, "train.json line 3: not valid JSON"),
])
def test_odd_text_files_are_one_line_naming_file_and_line(tmp_path, cache, files, message):
    from prepare import load_splits
    for name, text in files.items():
        (tmp_path / "stories").mkdir(exist_ok=True)
        (tmp_path / "stories" / name).write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(message)):
        load_splits(str(tmp_path / "stories"), "text")


def test_a_copy_of_the_whole_hub_repository_reads_its_data_shards(tmp_path, capsys):
    """The files `hf download roneneldan/TinyStories --repo-type=dataset --local-dir=ts` puts in one folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from prepare import local_files
    ts = tmp_path / "ts"
    (ts / "data").mkdir(parents=True)
    for name in ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt", "TinyStories-train.txt",
                 "TinyStories-valid.txt"):
        (ts / name).write_text("A story.\n<|endoftext|>\nAnother.\n", encoding="utf-8")
    (ts / "TinyStories_all_data.tar.gz").write_bytes(b"\x1f\x8b")
    (ts / "README.md").write_text("# TinyStories\n")
    (ts / "Evaluation prompts.yaml").write_text("- Once upon a time\n")
    (ts / ".cache" / "huggingface" / "download").mkdir(parents=True)  # hf download's own bookkeeping
    (ts / ".cache" / "huggingface" / "download" / "TinyStories-train.txt.metadata").write_text("x")
    for split, n in (("train", 4), ("validation", 1)):
        for i in range(n):
            pq.write_table(pa.table({"text": [f"Story {i}."]}), ts / "data" / f"{split}-{i:05d}-of-{n:05d}-abc.parquet")
    files, builder = local_files(str(ts))
    assert builder == "parquet" and len(files["train"]) == 4 and len(files["validation"]) == 1
    out = capsys.readouterr().out
    assert "the hub's data/ shards" in out
    for name in ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt", "TinyStories-train.txt",
                 "TinyStories-valid.txt", "TinyStories_all_data.tar.gz"):
        assert name in out.split("not read:")[1], out


# --------------------------------------------------------------------------------------------------------------
# export.py: leftovers of killed exports, a folder it cannot write, a full disk

def test_leftovers_of_killed_exports_are_cleaned_and_a_moved_export_put_back(tmp_path):
    import fcntl
    import export
    dest = tmp_path / "hf"
    (tmp_path / ".hf.tmp.abc123").mkdir()  # killed while writing the new export
    (tmp_path / ".hf.tmp.abc123" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".hf.old.def456" / "dir").mkdir(parents=True)  # killed between moving the old one aside and
    (tmp_path / ".hf.old.def456" / "dir" / export.MARKER).write_text("{}")  # putting the new one in its place
    running = tmp_path / ".hf.tmp.running"  # an export running now holds a lock on its folder
    running.mkdir()
    fd = os.open(running, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    other = tmp_path / ".other.tmp.xyz"  # another export_dir's
    other.mkdir()
    try:
        done = export.clean_leftovers(str(dest))
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.tmp.running", ".other.tmp.xyz", "hf"]
    assert (dest / export.MARKER).exists() and any("put back" in d for d in done)


def run_export(monkeypatch, tmp_path, tiny_models, export_dir):
    import export
    from files import save_torch as save_checkpoint
    save_checkpoint(tiny_checkpoint(tiny_models[0]["tok"]), tmp_path / "out" / "best_model_params.pt")
    for k in ("out_dir", "export_dir", "force", "checkpoint"):
        monkeypatch.setattr(export, k, getattr(export, k))  # main sets its settings; undo that afterwards
    monkeypatch.setattr(sys, "argv", ["export.py", f"--out_dir={tmp_path / 'out'}", f"--export_dir={export_dir}"])
    export.main()


def test_export_into_a_folder_it_cannot_write_is_one_line(monkeypatch, tmp_path, tiny_models):
    import tempfile

    def refuse(*args, **kwargs):  # what a read-only folder answers (tests may run as root, who may write anyway)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(UserError, match="cannot write in .* \\(Permission denied\\): choose an --export_dir"):
        run_export(monkeypatch, tmp_path, tiny_models, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_onto_a_full_disk_is_one_line_and_writes_nothing(monkeypatch, tmp_path, tiny_models):
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match="the export needs about .* MB but only 0.0 MB are free"):
        run_export(monkeypatch, tmp_path, tiny_models, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------------------------------------------
# A closed stdout (`| head -1`)

@pytest.mark.slow
@pytest.mark.parametrize("script", ["sample", "compare"])
def test_a_closed_stdout_ends_quietly(tmp_path, tiny_models, script):
    import subprocess
    from files import save_torch as save_checkpoint
    from conftest import ROOT
    if script == "sample":
        save_checkpoint(tiny_checkpoint(tiny_models[0]["tok"]), tmp_path / "best_model_params.pt")
        args = ["sample.py", f"--out_dir={tmp_path}", "--device=cpu", "--num_samples=2", "--max_new_tokens=20"]
    else:
        report = tmp_path / "eval.json"
        report.write_text(json.dumps({"kind": "tinystories-eval", "checkpoint": "x"}))
        args = ["eval.py", f"--compare={report},{report}"]
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line, as `| head -1` is after its line
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=write, stderr=subprocess.PIPE, text=True,
                          timeout=300)
    os.close(write)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, \
        proc.stderr


# --------------------------------------------------------------------------------------------------------------
# train.py: a read-only data_dir, a first run that died before its checkpoint, checkpoints from elsewhere

@pytest.mark.parametrize("errno_", ["EROFS", "EACCES"])
def test_a_read_only_data_dir_needs_no_shared_lock(tmp_path, monkeypatch, errno_):
    import errno
    import files
    real_open = os.open

    def read_only(path, flags, *args):  # what a read-only mount answers (tests may run as root, who may write)
        if str(path).endswith(".lock") and flags & os.O_CREAT:
            raise OSError(getattr(errno, errno_), os.strerror(getattr(errno, errno_)), path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(files.os, "open", read_only)
    (tmp_path / "data").mkdir()
    files.lock_dir(str(tmp_path / "data"), "train.py", shared=True)  # no error: the data cannot be rewritten
    with pytest.raises(UserError, match="cannot write in .*out.*choose a folder you can write to"):
        files.lock_dir(str(tmp_path / "out"), "train.py")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A data directory prepared from the stories above with a 300-id BPE vocabulary."""
    root = tmp_path_factory.mktemp("tiny_data")
    (root / "train.txt").write_text("\n\n".join(STORIES * 5), encoding="utf-8")
    (root / "validation.txt").write_text("\n\n".join(STORIES), encoding="utf-8")
    run_script("prepare.py", f"--dataset={root}", "--tokenizer=bpe", "--vocab_size=300", f"--data_dir={root}/data",
               "--num_proc=1", env={"HF_HOME": str(root / "hf")})
    return root / "data"


@pytest.mark.slow
def test_a_first_run_that_died_before_its_checkpoint_starts_again(tmp_path, tiny_data):
    from conftest import TINY
    from files import save_torch
    out = tmp_path / "out"  # what a run killed after its iteration-0 evaluation leaves
    save_torch({"model": {}, "model_args": {}, "tokenizer": {}, "config": {}, "iter_num": 0},
               out / "best_model_params.pt")
    (out / "log.csv").write_text("iter,tokens\n0,0\n")
    args = [*TINY, f"--data_dir={tiny_data}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2"]
    assert_user_error(run_script("train.py", *args, "--init_from=resume", check=False),
                      "stopped before its first checkpoint", "without --init_from=resume")
    proc = run_script("train.py", *args)
    assert "starting again" in proc.stdout and (out / "ckpt.pt").exists()
    assert_user_error(run_script("train.py", *args, check=False), "already holds a run")  # now a real run


@pytest.mark.slow
def test_checkpoints_from_elsewhere_and_huge_models_are_one_line(tmp_path, tiny_data, tiny_models):
    from conftest import TINY
    from files import save_torch
    tok = tiny_models[0]["tok"]
    save_torch(tiny_checkpoint(tok, model=["not", "a", "dict"]), tmp_path / "list.pt")
    wide = tiny_checkpoint(tok)
    wide["model_args"]["n_embd"] = 32
    save_torch(wide, tmp_path / "wide.pt")
    for name, message in (("list.pt", "the 'model' entry) are a list"), ("wide.pt", "do not fit its model_args")):
        proc = run_script("train.py", *TINY, f"--data_dir={tiny_data}", f"--out_dir={tmp_path}/ft",
                          f"--init_from={tmp_path / name}", check=False)
        assert_user_error(proc, name, message)
    proc = run_script("train.py", *TINY, f"--data_dir={tiny_data}", f"--out_dir={tmp_path}/huge", "--n_layer=400",
                      "--n_embd=16384", "--n_head=64", check=False)
    assert_user_error(proc, "M parameters: training (weights, gradients and the optimizer's moments) need about")

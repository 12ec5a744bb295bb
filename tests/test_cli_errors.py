"""Mistakes on the command line: the bad-input table of docs/robustness.md, one row per case (each mistake gets one
line on stderr, exit code 2, nothing lost), values of the right type that make no sense, and a closed stdout."""
import json
import os
import sys

import pytest

from configurator import UserError, check_values
from files import save_torch
from model import GPT, GPTConfig
from tokenizer import load_tokenizer
from conftest import GPT2_RANKS, TINY, assert_user_error, run_script, tiny_checkpoint


def save_tiny_checkpoint(path, tokenizer_sha="0" * 64, spec=None):
    """Save an untrained one-layer checkpoint at `path` for the bad-input rows."""
    args = dict(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=8, dropout=0.0, bias=True)
    spec = spec or {"kind": "bpe", "name": "bpe-64", "sha256": tokenizer_sha, "json": "{}"}
    save_torch({"model": GPT(GPTConfig(**args)).state_dict(), "model_args": args, "tokenizer": spec,
                     "config": {}, "iter_num": 1, "best_val_loss": 9.0}, path)


def setup_files(row, tmp):
    """Create what a row needs on disk; return nothing."""
    if row == "failing_config":
        (tmp / "bad.py").write_text("batch_size = 8\nlearning_rate = 1 / 0\n")
    elif row == "no_text_column":
        (tmp / "stories").mkdir()
        (tmp / "stories" / "train.jsonl").write_text("".join(json.dumps({"title": f"{i}", "body": f"Story {i}."})
                                                             + "\n" for i in range(10)))
    elif row == "empty_split":
        (tmp / "stories").mkdir()
        (tmp / "stories" / "train.txt").write_text("A story.\n\nAnother story.\n")
        (tmp / "stories" / "validation.txt").write_text("\n\n\n")
    elif row == "corrupt_checkpoint":
        (tmp / "ck").mkdir()
        (tmp / "ck" / "best_model_params.pt").write_bytes(b"this is not a checkpoint" * 100)
    elif row == "truncated_checkpoint":
        (tmp / "ck").mkdir()
        save_tiny_checkpoint(tmp / "full.pt")
        data = (tmp / "full.pt").read_bytes()
        (tmp / "ck" / "best_model_params.pt").write_bytes(data[:len(data) // 2])
    elif row == "other_vocabulary":
        (tmp / "ck").mkdir()
        save_tiny_checkpoint(tmp / "ck" / "ckpt.pt")
    elif row == "kv_cache_beyond_memory":
        (tmp / "ck").mkdir()
        save_tiny_checkpoint(tmp / "ck" / "best_model_params.pt", spec=load_tokenizer(str(GPT2_RANKS)).spec)
    elif row == "run_exists":
        (tmp / "ck").mkdir()
        save_tiny_checkpoint(tmp / "ck" / "ckpt.pt")


# (row, script, arguments, fragments of the one-line message). {tmp}: a fresh directory, {data}: prepared sample.
ROWS = [
    ("unknown_key", "train.py", ["--batch_sise=8"], ["unknown key 'batch_sise'; did you mean batch_size?"]),
    ("wrong_type", "train.py", ["--batch_size=8.5"], ["batch_size must be int", "got float 8.5"]),
    ("missing_config", "train.py", ["config/nope.py"], ["config file 'config/nope.py' not found"]),
    ("failing_config", "train.py", ["{tmp}/bad.py"], ["bad.py failed at line 2: ZeroDivisionError"]),
    ("dataset_not_found", "prepare.py", ["--dataset=./no/such/dir"], ["dataset './no/such/dir' not found"]),
    ("no_text_column", "prepare.py", ["--dataset={tmp}/stories", f"--tokenizer={GPT2_RANKS}", "--data_dir={tmp}/d"],
     ["no column 'text'", "(columns: title, body)", "--text_column=NAME"]),
    ("empty_split", "prepare.py", ["--dataset={tmp}/stories", f"--tokenizer={GPT2_RANKS}", "--data_dir={tmp}/d"],
     ["the validation split", "is empty"]),
    ("missing_data", "train.py", ["--data_dir={tmp}/none"], ["no prepared data", "run `python prepare.py"]),
    ("cuda_missing", "train.py", ["--data_dir={data}", "--device=cuda"],
     ["device 'cuda' is not available on this machine", "available: cpu"]),
    ("mps_off_mac", "train.py", ["--data_dir={data}", "--device=mps"], ["MPS needs a Mac", "available: cpu"]),
    # 1024 x 2048 tokens: more than either split of the shared sample or of the tests' own corpus
    ("batch_larger_than_data", "train.py", ["--data_dir={data}", "--batch_size=1024", "--block_size=2048"],
     ["a batch of 1024 x 2048 = 2,097,152 tokens is larger than the train split", "lower batch_size or block_size"]),
    ("block_size_larger_than_split", "train.py", ["--data_dir={data}", "--block_size=200000"],
     ["not more than block_size=200000"]),
    ("min_lr_above_learning_rate", "train.py", ["--data_dir={data}", "--min_lr=0.01"],
     ["min_lr=0.01 is larger than learning_rate=0.003"]),
    ("n_embd_not_divisible", "train.py", ["--data_dir={data}", "--n_embd=30", "--n_head=4"],
     ["n_embd=30 is not divisible by n_head=4"]),
    ("run_exists", "train.py", ["--data_dir={data}", "--out_dir={tmp}/ck"],
     ["already holds a run (ckpt.pt)", "--init_from=resume"]),
    ("other_vocabulary", "train.py", ["--data_dir={data}", "--out_dir={tmp}/ck", "--init_from=resume"],
     ["was trained with another tokenizer (bpe-64 (fingerprint ", "resume with the data it was trained on"]),
    ("no_checkpoint", "sample.py", ["--out_dir={tmp}"], ["no checkpoint at", "python train.py"]),
    ("corrupt_checkpoint", "sample.py", ["--out_dir={tmp}/ck"], ["not a readable checkpoint (truncated or corrupt?)"]),
    ("truncated_checkpoint", "sample.py", ["--out_dir={tmp}/ck"],
     ["not a readable checkpoint (truncated or corrupt?)"]),
    ("max_new_tokens_beyond_reason", "sample.py", ["--max_new_tokens=10000000"],
     ["max_new_tokens=10,000,000 is beyond reason", "at most 100,000"]),
    ("prompt_not_unicode", "sample.py", ["--start=Once \udcff"],
     ["--start: the value is not valid UTF-8 text (byte 0xff at position 5)"]),
    ("negative_temperature", "sample.py", ["--temperature=-1"], ["temperature and top_k must be >= 0"]),
    ("int8_off_cpu", "sample.py", ["--quantize=int8", "--device=cuda"], ["--quantize=int8 runs on the CPU"]),
    ("temperature_overflow", "sample.py", ["--temperature=1e300"], ["temperature=1e+300 is beyond reason"]),
    ("kv_cache_beyond_memory", "sample.py", ["--out_dir={tmp}/ck", "--num_samples=100000000000"],
     ["num_samples=100,000,000,000 stories at once need about", "lower num_samples"]),
    ("seed_beyond_64_bits", "train.py", ["--data_dir={data}", "--seed=18446744073709551616"],
     ["seed must be a seed from 0 to 2**64 - 1"]),
    ("beta_of_one", "train.py", ["--data_dir={data}", "--beta2=1.0"], ["beta2 must be in [0, 1), got 1.0"]),
]


@pytest.mark.slow  # starts scripts as subprocesses
@pytest.mark.parametrize("row,script,args,fragments", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(row, script, args, fragments, tmp_path, sample_data, hf_home):
    setup_files(row, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args = [a.format(tmp=tmp_path, data=sample_data) for a in args]
    extra = [*TINY] if script == "train.py" else (["--device=cpu"] if script == "sample.py" else [])
    proc = run_script(script, *extra, *args, check=False, env={"HF_HOME": str(hf_home)})
    assert_user_error(proc, *fragments)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before  # nothing written, nothing half-written, nothing removed


def test_values_that_pass_the_type_check_but_make_no_sense():
    settings = dict(seed=2 ** 64, lr=float("nan"), beta=1.0, steps=0, wd=-0.1)
    for name, kind, message in (("seed", "seed", "seed must be a seed from 0 to 2\\*\\*64 - 1"),
                                ("lr", "rate", "lr must be a finite number above 0, got nan"),
                                ("beta", "fraction", r"beta must be in \[0, 1\), got 1.0"),
                                ("steps", "count", "steps must be at least 1, got 0"),
                                ("wd", "rate0", "wd must be a finite number, 0 or more")):
        with pytest.raises(UserError, match=message):
            check_values(settings, {name: kind})
    check_values(dict(seed=2 ** 64 - 1, lr=1e-3, beta=0.0, steps=1, wd=0.0),
                 dict(seed="seed", lr="rate", beta="fraction", steps="count", wd="rate0"))


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


# --- files that are not regular files, values that are not UTF-8 -----------------------------------------------------

def special_file(kind, tmp):
    """/dev/zero (endless bytes) or a FIFO made in tmp (opening it blocks until a writer comes)."""
    if kind == "dev_zero":
        return "/dev/zero"
    fifo = tmp / "fifo.txt"
    os.mkfifo(fifo)
    return str(fifo)


# (case, kind of file, script, arguments with {file}, fragment naming what it is): where the red team found them
SPECIAL = [
    *[(f"prompt-{kind}", kind, "sample.py", ["--start=FILE:{file}", "--device=cpu"],
       "(the prompt file of --start=FILE:)") for kind in ("dev_zero", "fifo")],
    *[(f"instruct-{kind}", kind, "eval.py", ["--instruct={file}", "--device=cpu"], "(the --instruct file)")
      for kind in ("dev_zero", "fifo")],
]


@pytest.mark.slow  # starts scripts as subprocesses
@pytest.mark.parametrize("case,kind,script,args,fragment", SPECIAL, ids=[c[0] for c in SPECIAL])
def test_a_device_or_fifo_named_as_a_file_is_refused_before_it_is_read(case, kind, script, args, fragment, tmp_path):
    path = special_file(kind, tmp_path)
    before = sorted(tmp_path.iterdir())
    # reading /dev/zero would fill the memory and opening the FIFO would block: the deadline fails such a run
    proc = run_script(script, *[a.format(file=path) for a in args], check=False, timeout=120)
    what = "a character device" if kind == "dev_zero" else "a FIFO (named pipe)"
    assert_user_error(proc, f"{path} {fragment} is {what}, not a regular file")
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("kind", ["dev_zero", "fifo"])
def test_every_file_a_user_names_goes_through_the_one_check(kind, tmp_path):
    """The other files the scripts read, in-process: each is refused by files.check_input_file before it is
    opened (a FIFO would block these calls, /dev/zero fill the memory)."""
    import eval as ev
    import prepare
    from tokenizer import load_tokenizer
    import threading
    path = special_file(kind, tmp_path)
    what = "a character device" if kind == "dev_zero" else "a FIFO (named pipe)"

    def refusal(call):
        """The UserError that call() raises, run in a thread with a deadline: one that opens the FIFO blocks, one
        that reads /dev/zero fills the memory, and the test fails on either instead of hanging."""
        errors = []

        def target():
            try:
                call()
            except UserError as e:
                errors.append(e)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(60)
        if thread.is_alive() and kind == "fifo":
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # let a blocked open go
        assert not thread.is_alive(), f"{call} did not return: it read or opened {path}"
        assert errors, f"{call} raised no UserError"
        return str(errors[0])

    for call, fragment in ((lambda: ev.text_documents(path), "(the --text file)"),
                           (lambda: ev.check_text_file(path), "(the --text file)"),
                           (lambda: ev.compare_reports([path]), "(the report)"),
                           (lambda: prepare.is_local(path), "(--dataset)"),
                           (lambda: prepare.check_text(path, "the train split"), "(the train split)"),
                           (lambda: prepare.check_parquet(path, "train"), "(the train split)"),
                           (lambda: load_tokenizer(path), "(the tokenizer file)")):
        assert f"{path} {fragment} is {what}, not a regular file" in refusal(call)


def test_files_are_checked_for_kind_and_size_before_they_are_read(tmp_path):
    from configurator import read_text
    from files import check_input_file
    import sample
    with pytest.raises(UserError, match=r"is a directory, not a regular file"):
        read_text(str(tmp_path), "the prompt file")
    with pytest.raises(UserError, match=r"nope.txt \(the prompt file\) does not exist"):
        read_text(str(tmp_path / "nope.txt"), "the prompt file")
    small = tmp_path / "small.txt"
    small.write_text("0123456789a")
    with pytest.raises(UserError, match=r"small.txt \(the x\) is too large: 11 bytes, the limit is 10"):
        read_text(str(small), "the x", limit=10)
    assert read_text(str(small), "the x", limit=11) == "0123456789a" and check_input_file(str(small), "x") == 11
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:  # a sparse file: 2 MiB long, nothing on the disk
        f.truncate(2 << 20)
    with pytest.raises(UserError, match=r"\(the prompt file of --start=FILE:\) is too large: 2,097,152 bytes, "
                                        r"the limit is 1,048,576"):
        sample.read_prompt(str(big))
    link = tmp_path / "link.txt"
    link.symlink_to("/dev/zero")  # a link is followed: what it points to counts
    with pytest.raises(UserError, match="link.txt \\(x\\) is a character device"):
        check_input_file(str(link), "x")


@pytest.mark.slow  # starts scripts as subprocesses
def test_a_value_that_is_not_utf8_is_refused_before_anything_is_written(tmp_path, sample_data):
    bad = os.fsdecode(b"\xff")  # what Python makes of the byte 0xff in argv: a lone surrogate
    proc = run_script("train.py", *TINY, f"--data_dir={sample_data}", f"--out_dir={tmp_path}/run{bad}",
                      check=False)
    assert_user_error(proc, "--out_dir: the value is not valid UTF-8 text (byte 0xff at position")
    assert list(tmp_path.iterdir()) == []  # no folder, no .lock
    proc = run_script("sample.py", f"--summary=a {bad}", f"--out_dir={tmp_path}", check=False)
    assert_user_error(proc, "--summary: the value is not valid UTF-8 text (byte 0xff at position 2)")


def test_a_config_file_value_that_is_not_utf8_is_refused(tmp_path):
    from configurator import configure
    cfg = tmp_path / "cfg.py"
    cfg.write_text('out_dir = "runs/\\udcff"\ntags = ["ok", "\\udc80"]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"cfg.py: out_dir: the value is not valid UTF-8 text \(byte 0xff at "
                                        r"position 5\)"):
        configure({"out_dir": "out", "tags": ["a"]}, [str(cfg)])
    with pytest.raises(UserError, match=r"--out_dir: the value is not valid UTF-8 text \(character U\+D800"):
        configure({"out_dir": "out"}, ["--out_dir='\\ud800'"])
    assert configure({"out_dir": "out"}, ["--out_dir=caf\u00e9"]) == {"out_dir": "caf\u00e9"}

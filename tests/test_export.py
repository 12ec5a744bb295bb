"""export.py: a checkpoint becomes a Hugging Face GPT-2, Llama or Qwen3 folder that `transformers` loads with no code
from here, computes the same logits, tokenizes text to the same ids, and generates. --force replaces only its own
folders; leftovers of killed exports are cleaned; a folder it cannot write, a full disk and a missing safetensors
are one line each."""
import json
import os
import sys

import pytest
import torch
from conftest import GPT2_RANKS, SAMPLE, assert_user_error, run_script, save_random_model
from conftest import tiny_checkpoint as untrained_checkpoint  # tiny_checkpoint here is this file's own

from configurator import UserError
from tokenizer import load_tokenizer
from prepare import train_bpe

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "café naïve Zoë — “quotes” ‘too’ über straße",
    "emoji 🙂🐶🦄 with skin tone 👋🏽 and ZWJ 👨‍👩‍👧",
    "new\nlines\n\n\nand\r\nCRLF",
    "multiple   spaces,\ttabs\t\tand trailing spaces   ",
    " leading space", "中文, русский, العربية", "It's 3.14 o'clock; we'll see. I'm 42!",
]


@pytest.fixture(scope="module", autouse=True)
def offline():
    """transformers in this process must never reach the network."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in OFFLINE.items():
            mp.setenv(k, v)
        yield


def tiny_checkpoint(out_dir, tok, bias, **switches):
    """A 2-layer, 32-wide GPT over `tok` saved in out_dir (conftest.save_random_model: every parameter randomised).
    `switches`: GPTConfig's recipe fields (pos_embedding, norm, mlp, qk_norm, tie_embeddings)."""
    return save_random_model(out_dir, tok, block_size=32, n_embd=32, bias=bias, **switches)


@pytest.fixture(scope="module", params=["gpt2-bias", "bpe-nobias"])
def case(request, tmp_path_factory):
    """Export a tiny model: GPT-2's ranks with biases, or a 512-id vocabulary trained on the sample without
    biases (over an existing folder, with --force).
    Returns (export dir, our model, our tokenizer, transformers model, transformers tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "gpt2-bias":
        tok, bias = load_tokenizer(str(GPT2_RANKS)), True
    else:
        docs = [d for d in (SAMPLE / "train.txt").read_text(encoding="utf-8").split("\n\n") if d.strip()]
        tok, bias = train_bpe(docs, 512), False
    ours = tiny_checkpoint(root / "out", tok, bias)
    export = root / "hf_model"
    force = []
    if not bias:  # also: --force replaces an earlier export, and nothing is left beside it
        export.mkdir()
        (export / "old.txt").write_text("replaced")
        (export / ".tinystories-export").write_text("{}")
        force = ["--force"]
    run_script("export.py", f"--out_dir={root / 'out'}", f"--export_dir={export}", *force, env=OFFLINE)
    assert sorted(os.listdir(root)) == ["hf_model", "out"]
    hf = AutoModelForCausalLM.from_pretrained(export).eval()
    return export, ours, tok, hf, AutoTokenizer.from_pretrained(export)


def test_folder_is_a_standard_gpt2_model(case):
    export, ours, tok, hf, _ = case
    assert sorted(os.listdir(export)) == [".tinystories-export", "config.json", "generation_config.json",
                                          "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["activation_function"] == "gelu"
    assert config["vocab_size"] == ours.config.vocab_size and config["n_positions"] == config["n_ctx"] == 32
    assert hf.config.eos_token_id == hf.config.bos_token_id == tok.eot_token
    from safetensors import safe_open
    with safe_open(export / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names  # tied to transformer.wte.weight, as GPT-2 ships it
    assert names == {k for k in hf.state_dict() if k != "lm_head.weight"}
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()


def test_same_logits_as_ours(case):
    _, ours, _, hf, _ = case
    rng = torch.Generator().manual_seed(1)
    idx = torch.randint(0, ours.config.vocab_size, (2, ours.config.block_size), generator=rng)  # padding ids too
    with torch.no_grad():
        expected, _ = ours(idx, torch.zeros_like(idx))
        got = hf(idx).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


def test_same_token_ids_as_ours(case):
    _, _, tok, _, hf_tok = case
    assert hf_tok.eos_token_id == hf_tok.bos_token_id == tok.eot_token and hf_tok.model_max_length == 32
    for text in TEXTS:
        ids = tok.encode(text)
        assert hf_tok(text)["input_ids"] == ids, text
        assert hf_tok.decode(ids) == text
    assert hf_tok.decode([tok.eot_token]) == "<|endoftext|>"


def test_generates_and_never_produces_padding_ids(case):
    _, ours, tok, hf, hf_tok = case
    from transformers import pipeline
    generate = pipeline("text-generation", model=hf, tokenizer=hf_tok)
    text = generate("Once upon a time", max_new_tokens=5)[0]["generated_text"]
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time")
    if tok.vocab_size < ours.config.vocab_size:  # make the padding rows win every argmax: they must stay unused
        padding = hf.transformer.wte.weight[tok.vocab_size:]
        saved = padding.detach().clone()
        try:
            with torch.no_grad():
                padding *= 1000
            out = hf.generate(torch.tensor([tok.encode("Once upon a time")]), max_new_tokens=8, top_k=1)  # greedy
        finally:
            with torch.no_grad():
                padding.copy_(saved)
        assert out.shape[1] > 4 and out.max().item() < tok.vocab_size


@pytest.mark.slow
def test_refuses_to_overwrite_without_force(tmp_path, monkeypatch):
    tok = load_tokenizer(str(GPT2_RANKS))
    tiny_checkpoint(tmp_path / "out", tok, bias=True)
    dest = tmp_path / "hf_model"
    dest.mkdir()
    (dest / "old.txt").write_text("keep me")
    proc = run_script("export.py", f"--out_dir={tmp_path / 'out'}", f"--export_dir={dest}", check=False, env=OFFLINE)
    assert_user_error(proc, "already exists", "--force")
    assert os.listdir(dest) == ["old.txt"]
    proc = run_script("export.py", f"--out_dir={tmp_path / 'nowhere'}", f"--export_dir={tmp_path / 'new'}",
                      check=False, env=OFFLINE)
    assert_user_error(proc, "no checkpoint at", "python train.py")
    assert sorted(os.listdir(tmp_path)) == ["hf_model", "out"]  # nothing written

    import export  # --force never deletes the checkpoint it exports (checked in-process: no second start-up)
    monkeypatch.setattr(export, "force", True)
    with pytest.raises(UserError, match="holds the checkpoint"):
        export._check_destination(str(tmp_path), str(tmp_path / "out" / "best_model_params.pt"))
    (dest / export.MARKER).write_text("{}")  # an earlier export elsewhere: --force may replace it
    export._check_destination(str(dest), str(tmp_path / "out" / "best_model_params.pt"))
    os.remove(dest / export.MARKER)
    # constants are not settings: no command line redirects the marker --force looks for, or changes the model
    run_dir = tmp_path / "out"
    (run_dir / "log.csv").write_text("iter\n")
    for flag in ("--MARKER=log.csv", f"--MARKER={run_dir / 'log.csv'}", "--NORM_EPS=0.5", "--ROPE_THETA=7"):
        proc = run_script("export.py", f"--out_dir={run_dir}", f"--export_dir={run_dir}", "--force", flag,
                          check=False, env=OFFLINE)
        assert_user_error(proc, f"unknown key '{flag[2:].split('=')[0]}'")
        assert sorted(os.listdir(run_dir)) == ["best_model_params.pt", "log.csv"]  # the run folder is intact


MODERN = {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu"}


@pytest.fixture(scope="module", params=["LlamaForCausalLM", "Qwen3ForCausalLM"])
def modern(request, tmp_path_factory):
    """Export a tiny rope + rmsnorm + swiglu model without biases (Llama), and the same with qk_norm and an
    untied head (Qwen3), over GPT-2's ranks. Returns (export dir, our model, our tokenizer, transformers model)."""
    from transformers import AutoModelForCausalLM
    root = tmp_path_factory.mktemp(request.param)
    qwen = request.param == "Qwen3ForCausalLM"
    tok = load_tokenizer(str(GPT2_RANKS))
    ours = tiny_checkpoint(root / "out", tok, False, **MODERN, qk_norm=qwen, tie_embeddings=not qwen)
    run_script("export.py", f"--out_dir={root / 'out'}", f"--export_dir={root / 'hf_model'}", env=OFFLINE)
    hf = AutoModelForCausalLM.from_pretrained(root / "hf_model").eval()
    assert type(hf).__name__ == request.param
    return root / "hf_model", ours, tok, hf


def test_modern_recipes_export_to_llama_and_qwen3_with_the_same_logits(modern):
    export, ours, tok, hf = modern
    config = json.loads((export / "config.json").read_text())
    assert config["rope_theta"] == 10000.0 and config["intermediate_size"] == 88  # swiglu_hidden(32)
    assert config["tie_word_embeddings"] == ours.config.tie_embeddings
    from safetensors import safe_open
    with safe_open(export / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert names == {k for k in hf.state_dict() if k != "lm_head.weight" or not ours.config.tie_embeddings}
    assert ("lm_head.weight" in names) == (not ours.config.tie_embeddings)
    rng = torch.Generator().manual_seed(1)
    idx = torch.randint(0, ours.config.vocab_size, (2, ours.config.block_size), generator=rng)
    with torch.no_grad():
        expected, _ = ours(idx, torch.zeros_like(idx))
        got = hf(idx).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4
    from transformers import AutoTokenizer
    text = TEXTS[0]
    assert AutoTokenizer.from_pretrained(export)(text)["input_ids"] == tok.encode(text)


@pytest.mark.parametrize("switches,nearest,fix", [
    ({"mlp": "relu2"}, "GPT2LMHeadModel", "--mlp=gelu"),
    ({**MODERN, "bias": True}, "LlamaForCausalLM", "--bias=False"),
    ({**MODERN, "mlp": "gelu", "qk_norm": True, "bias": True}, "Qwen3ForCausalLM", "--mlp=swiglu --bias=False"),
])
def test_recipes_without_a_transformers_class_are_refused_naming_the_nearest(switches, nearest, fix):
    from export import architecture
    with pytest.raises(UserError, match=f"nearest that exports is {nearest}, trained with {fix}$"):
        architecture(switches)
    assert architecture({**MODERN, "bias": False, "tie_embeddings": False}) == "LlamaForCausalLM"
    assert architecture({"bias": False, "tie_embeddings": False}) == "GPT2LMHeadModel"


def test_export_force_only_replaces_its_own_folders_compared_by_real_path(tmp_path, monkeypatch):
    import export
    monkeypatch.setattr(export, "force", True)
    run = tmp_path / "out"
    run.mkdir()
    (run / "best_model_params.pt").write_bytes(b"weights")
    (tmp_path / "link").symlink_to(run)  # --out_dir reached through a link to the export_dir
    with pytest.raises(UserError, match="holds the checkpoint"):
        export._check_destination(str(run), str(tmp_path / "link" / "best_model_params.pt"))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="was not written by export.py"):
        export._check_destination(str(other), str(run / "best_model_params.pt"))
    monkeypatch.chdir(other)
    with pytest.raises(UserError, match="was not written by export.py"):
        export._check_destination(".", str(run / "best_model_params.pt"))


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
    save_checkpoint(untrained_checkpoint(tiny_models[0]["tok"]), tmp_path / "out" / "best_model_params.pt")
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


@pytest.mark.slow  # export.py as a subprocess
def test_export_without_safetensors_names_the_pip_install(tmp_path):
    # a safetensors package that cannot be imported, found before the installed one: a machine without it
    blocked = tmp_path / "blocked" / "safetensors"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('not installed')\n")
    proc = run_script("export.py", f"--out_dir={tmp_path}", f"--export_dir={tmp_path}/hf", check=False,
                      env={"PYTHONPATH": str(blocked.parent)})
    assert_user_error(proc, "export.py needs safetensors: pip install safetensors")
    assert not (tmp_path / "hf").exists()

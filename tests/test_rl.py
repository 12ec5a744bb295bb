"""rl.py: the reward (instruct.reward) on hand-written stories, the probabilities it trains on (the sampler's own),
one policy-gradient step that moves them the right way, and whole runs: the run folder, exact resume, bad input."""
import json
import os
import signal
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

import model as model_module
import rl
from checkpoint import load_checkpoint
from conftest import ROOT, STORIES, assert_user_error, read_log, run_script
from files import save_torch
from instruct import (ENDING_WEIGHT, NATURAL_USES, OVERUSE_SPAN, REWARD_PARTS, WORDS_WEIGHT, header, longest_repeat,
                      reward, reward_events, words)
from model import GPT, GPTConfig
from prepare import train_bpe
from tokenizer import tokenizer_from_meta

# a story of TinyStories' kind: 89 words, "dog" twice, "ball" and "happy" once, no phrase of more than 3 words twice
NATURAL = ("Once upon a time, a little dog named Max found a red ball in the park. He pushed it with his nose and "
           "ran after it all day. His friend Lily laughed and clapped her hands. When the sun went down, Max was "
           "tired but very happy. Lily gave the dog a hug, and they walked home together. At home, Mom made warm "
           "soup for dinner. Max curled up on his soft bed by the window and dreamed of the park. The end.")


def test_reward_of_a_natural_story_and_its_parts():
    assert len(words(NATURAL)) >= 80 and longest_repeat(words(NATURAL)) <= 6
    r = reward(["dog", "ball", "happy"], NATURAL, ended=True)
    assert r == {"reward": WORDS_WEIGHT + ENDING_WEIGHT, "words": 1.0, "overuse": 0.0, "ending": 1.0, "loop": 0.0}
    assert list(r) == list(REWARD_PARTS)
    # a word missing: its third of the words part
    assert reward(["dog", "ball", "kite"], NATURAL, True)["words"] == pytest.approx(2 / 3)
    # not ended (cut at the token limit), or ended too soon to be a story: no ending
    assert reward(["dog"], NATURAL, ended=False)["ending"] == 0.0
    assert reward(["dog"], "The dog was happy. The end.", ended=True)["ending"] == 0.0
    # no word asked for: nothing to use or overuse
    assert reward([], NATURAL, True) == {"reward": ENDING_WEIGHT, "words": 0.0, "overuse": 0.0, "ending": 1.0,
                                         "loop": 0.0}


def test_reward_overuse_and_loops():
    # each use beyond NATURAL_USES costs 1 / OVERUSE_SPAN of the word's worth, up to all of it
    for uses in range(1, 12):
        text = " ".join(f"The dog number {i} ran." for i in range(uses))
        expected = min(1.0, max(0, uses - NATURAL_USES) / OVERUSE_SPAN)
        assert reward(["dog"], text, False)["overuse"] == pytest.approx(expected), uses
    assert reward(["dog"], "The dog ran. " * (NATURAL_USES + 1), False)["overuse"] > 0
    # "dog" said NATURAL_USES + OVERUSE_SPAN times: worth no more than not using it
    stuffed = NATURAL.replace("ball", "ball" + ", dog" * OVERUSE_SPAN)
    r = reward(["dog", "ball", "happy"], stuffed, True)
    assert r["words"] == 1.0 and r["overuse"] == pytest.approx(1 / 3)
    missing = reward(["kite", "ball", "happy"], NATURAL, True)
    assert missing["words"] == pytest.approx(2 / 3) and r["reward"] == pytest.approx(missing["reward"])
    assert reward(["dog", "ball", "happy"], NATURAL, True)["reward"] - r["reward"] == pytest.approx(WORDS_WEIGHT / 3)
    # the longest repeated phrase: free up to 6 words, then 1/6 per word, a whole point from 12 words
    phrase = "the big brown dog ran to the old red barn by the lake"  # 13 words, no word pair twice
    for n, loop in ((6, 0.0), (8, 2 / 6), (12, 1.0), (13, 1.0)):
        part = " ".join(phrase.split()[:n])
        text = f"{part}. Then it rained. {part}."
        assert longest_repeat(words(text)) == n
        assert reward([], text, False)["loop"] == pytest.approx(loop), n


def tiny_model(seed=0, block_size=64):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=320, block_size=block_size, n_layer=1, n_head=2, n_embd=16, dropout=0.0,
                         pos_embedding="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False)).eval()


@pytest.mark.parametrize("keep, prompt_len", [(0, 3), (5, 5), (15, 15)])
def test_story_logits_are_the_samplers_own(keep, prompt_len, monkeypatch):
    # record the logits generate_stream samples each token from, over windows that slide (100 tokens, context 32)
    seen = []
    draw = model_module.sample_next
    monkeypatch.setattr(model_module, "sample_next", lambda logits, *a, **k: (seen.append(logits), draw(logits, *a,
                                                                                                        **k))[1])
    model = tiny_model(block_size=32)
    idx = torch.randint(0, 300, (3, prompt_len), generator=torch.Generator().manual_seed(1))
    out = model.generate(idx, 100, temperature=1.0, generator=torch.Generator().manual_seed(2), keep=keep)
    with torch.no_grad():
        logits = rl.story_logits(model, out, prompt_len, keep)
    assert logits.shape == (3, 100, 320)
    torch.testing.assert_close(logits, torch.stack(seen, dim=1), rtol=0, atol=1e-5)


def test_story_mask_keeps_the_first_end_of_text():
    new = torch.tensor([[5, 6, 0, 0, 0], [5, 0, 7, 0, 0], [5, 6, 7, 8, 9]])
    assert rl.story_mask(new, 0).tolist() == [[True, True, True, False, False], [True, True, False, False, False],
                                              [True] * 5]


@pytest.mark.parametrize("asked", ["dog", "cat"])
def test_one_policy_gradient_step_raises_the_rewarded_story(asked):
    # two stories for one instruction that differ in one word; the one that uses the asked-for word is rewarded
    # there, and after one step that word is more likely at that place and the other word less (the control swaps
    # which one is asked for)
    tok = train_bpe(STORIES, 300)
    model, start = tiny_model(), tiny_model()
    prompt = tok.encode(header([asked]))
    stories = [tok.encode(f" The {w} sat in the sun.") + [tok.eot_token] for w in ("dog", "cat")]
    at = next(i for i, (a, b) in enumerate(zip(*stories)) if a != b)  # where the stories differ: the word
    idx = torch.tensor([prompt + s for s in stories])

    def word_logp():
        with torch.no_grad():
            logits = rl.story_logits(model, idx, len(prompt), len(prompt))[:, at, :tok.vocab_size]
        return torch.log_softmax(logits / rl.temperature, dim=-1)[[0, 1], [stories[0][at], stories[1][at]]]

    before = word_logp()
    row = {"words": [asked], "features": [], "summary": None}
    means, kl, tokens, loss = rl.policy_step(model, start, tok, [row], [(len(prompt), idx, [0, 0])], nullcontext())
    assert means["words"] == 0.5 and kl == pytest.approx(0.0, abs=1e-7)  # one story of two uses the word
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    gain = word_logp() - before
    up, down = (0, 1) if asked == "dog" else (1, 0)
    assert gain[up] > 0 > gain[down], gain


def test_advantages_credit_what_each_token_earned():
    # two groups of two stories; story 0 earns 1 at its token 1, story 1 nothing, story 2 loses 1 at its end
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    adv = rl.advantages(rewards, torch.tensor([0, 0, 1, 1]))
    assert adv.tolist() == [[1.0, 1.0, 0.0], [-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]
    # at the first token, the advantage is the reward minus the mean of the others' rewards (GRPO's)
    total = rewards.sum(dim=1)
    assert adv[:, 0].tolist() == [total[0] - total[1], total[1] - total[0], total[2] - total[3], total[3] - total[2]]


def test_token_rewards_land_on_the_tokens_that_earned_them():
    tok = train_bpe(STORIES, 300)
    text = "The cat liked to play in the sun. The cat was happy."
    story = tok.encode(text) + [tok.eot_token]
    parts, events = reward_events(["cat", "sun"], text, True)
    rewards = rl.token_rewards(tok, story, events)
    assert sum(rewards) == pytest.approx(parts["reward"])
    # each word's first use, on the token that writes its first letter; the end (no loop, too short) earns nothing
    earned = {i: r for i, r in enumerate(rewards) if r}
    assert list(earned.values()) == [WORDS_WEIGHT / 2] * 2
    first, second = (tok.decode(story[i:-1]).lstrip() for i in earned)
    assert first.startswith("cat liked") and second.startswith("sun.")


# --- whole runs -------------------------------------------------------------------------------------------------

WORDS = [["dog", "ball", "happy"], ["cat", "sun", "play"], ["red", "ball", "run"], ["dog", "sun", "tree"]]


@pytest.fixture(scope="module")
def rl_start(tiny_data, tmp_path_factory):
    """An instructed model to start from (random weights over tiny_data's tokenizer, saved as train.py saves an
    instructed model) and an instructions file of 12 rows: (checkpoint path, instructions path)."""
    root = tmp_path_factory.mktemp("rl_start")
    tok = tokenizer_from_meta(json.loads((tiny_data / "meta.json").read_text()), str(tiny_data))
    model = tiny_model()
    args = {k: getattr(model.config, k) for k in model.config.__dataclass_fields__}
    path = root / "best_model_params.pt"
    save_torch({"model": model.state_dict(), "model_args": args, "tokenizer": tok.spec, "instruct": True,
                "config": {"data_dir": str(tiny_data)}, "iter_num": 0}, path)
    instructions = root / "train.json"
    instructions.write_text(json.dumps([{"story": "x", "instruction": {"words": WORDS[i % 4], "features": []}}
                                        for i in range(12)]))
    return path, instructions


def rl_args(rl_start, out, *more):
    path, instructions = rl_start
    return [f"--init_from={path}", f"--instructions={instructions}", f"--out_dir={out}", "--device=cpu",
            "--dtype=float32", "--batch_size=2", "--group_size=3", "--eval_rows=2", "--max_new_tokens=24",
            "--eval_interval=2", "--learning_rate=1e-2", *more]


@pytest.mark.slow  # starts scripts as subprocesses
def test_rl_run_folder_is_read_by_sample_and_eval(rl_start, tmp_path):
    out = tmp_path / "o"
    proc = run_script("rl.py", *rl_args(rl_start, out, "--max_iters=3"))
    assert "10 instructions to train on, 2 held out" in proc.stdout
    assert {p.name for p in out.iterdir()} >= {"ckpt.pt", "best_model_params.pt", "log.csv", "rl.png"}
    log = read_log(out)
    assert sorted(log) == [0, 1, 2, 3]
    assert all(log[i]["reward"] and log[i]["kl"] for i in (0, 1, 2)) and not log[3]["reward"]
    assert all(log[i]["eval_reward"] for i in (0, 2, 3)) and not log[1]["eval_reward"]
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == 3 and ckpt["instruct"] and ckpt["rl"]["group_size"] == 3
    assert float(log[3]["elapsed_s"]) >= float(log[2]["elapsed_s"])
    # best_model_params.pt is an instructed model like any other
    proc = run_script("sample.py", f"--out_dir={out}", "--words=dog,ball", "--start=", "--num_samples=1",
                      "--max_new_tokens=8", "--device=cpu")
    assert "not trained for them" not in proc.stderr
    report = tmp_path / "eval.json"
    run_script("eval.py", f"--out_dir={out}", f"--instruct={rl_start[1]}", "--num_samples=2", "--max_new_tokens=8",
               "--device=cpu", f"--report={report}", "--vocab_tokens=0")
    result = json.loads(report.read_text())
    assert result["instruct"]["trained_with_instructions"] and set(result["instruct"]["reward"]) == set(REWARD_PARTS)


@pytest.mark.slow  # starts scripts as subprocesses
def test_rl_resume_is_exact(rl_start, tmp_path):
    run_script("rl.py", *rl_args(rl_start, tmp_path / "a", "--max_iters=4"))
    run_script("rl.py", *rl_args(rl_start, tmp_path / "b", "--max_iters=2"))
    proc = run_script("rl.py", *rl_args(rl_start, tmp_path / "b", "--max_iters=4", "--init_from=resume"))
    assert "resuming from iteration 2" in proc.stdout and "max_iters 2 -> 4" in proc.stdout
    a, b = load_checkpoint(tmp_path / "a" / "ckpt.pt"), load_checkpoint(tmp_path / "b" / "ckpt.pt")
    assert a["iter_num"] == b["iter_num"] == 4
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    for i in range(4):
        assert {k: v for k, v in log_a[i].items() if k != "elapsed_s"} == \
               {k: v for k, v in log_b[i].items() if k != "elapsed_s"}, i


@pytest.mark.slow  # starts scripts as subprocesses
def test_rl_bad_input_is_one_line(rl_start, tmp_path, tiny_data):
    path, instructions = rl_start
    plain = tmp_path / "plain.pt"  # the same model, trained without instructions
    ckpt = torch.load(path, weights_only=True)
    save_torch({**ckpt, "instruct": False}, plain)
    long = tmp_path / "long.json"  # a header far longer than half the model's context
    long.write_text(json.dumps([{"instruction": {"words": WORDS[0] * 20}}] * 12))
    cases = [(["--group_size=1"], "group of one learns nothing"),
             ([f"--init_from={plain}"], "was not trained with instructions"),
             ([f"--instructions={long}"], "row 0: its header is"),
             (["--init_from=resume"], "no checkpoint at"),
             (["--temperature=0"], "temperature=0")]
    for more, fragment in cases:
        out = tmp_path / "o"
        proc = run_script("rl.py", *rl_args(rl_start, out), *more, check=False)
        assert_user_error(proc, fragment)
        assert not (out / "log.csv").exists(), more
    # a train.py run folder is not resumed by rl.py, nor an rl.py one by train.py
    run_script("rl.py", *rl_args(rl_start, tmp_path / "r", "--max_iters=2"))
    proc = run_script("train.py", f"--out_dir={tmp_path / 'r'}", f"--data_dir={tiny_data}", "--init_from=resume",
                      "--device=cpu", check=False)
    assert_user_error(proc, "written by rl.py")
    proc = run_script("rl.py", *rl_args(rl_start, tmp_path / "r"), check=False)  # a new run into a used out_dir
    assert_user_error(proc, "already holds a run")


@pytest.mark.slow  # starts scripts as subprocesses
def test_rl_ctrl_c_finishes_the_iteration_and_saves(rl_start, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, str(ROOT / "rl.py"), *rl_args(rl_start, out, "--max_iters=100000",
                                                                         "--eval_interval=1")],
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:
        if line.startswith("iter 2:"):
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert "rl.py" in stdout and "--init_from=resume" in stdout
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] >= 2 and sorted(read_log(out)) == list(range(ckpt["iter_num"] + 1))

"""Stories on request: prepare.py --instruct writes each story after its instructions, sample.py and eval.py build
the same header, and eval.py --instruct measures which required words and features the stories have."""
import json
import re
from urllib.parse import urlencode

import numpy as np
import pytest

import sample
import serve
from conftest import TINY, assert_user_error, run_script
from conftest import GPT2_RANKS
from instruct import (REWARD_PARTS, TrainingWindows, document_headers, forms, has_feature, header, header_chars,
                      load_instructions, reward, score, summarize, uses)
from tokenizer import load_tokenizer, tokenizer_from_meta

STORY_A = 'Tom had a red ball. He said, "Let us play!" They played all day.'
STORY_B = "A cat sat in the sun. It was warm and happy."
STORY_C = "Sue found a big shell by the sea. She kept it in a box."
ROWS = [
    {"story": STORY_A, "instruction": {"prompt:": "Write a story...", "words": ["play", "ball", "red"],
                                       "features": ["Dialogue"]}, "summary": "Tom plays\nwith a ball.",
     "source": "GPT-4"},
    {"story": STORY_B, "instruction": None, "summary": None, "source": "GPT-4"},  # no instructions
    {"story": STORY_C, "instruction": {"words": ["find, shell"], "features": []}, "summary": None,
     "source": "GPT-4"},  # a comma inside a word: the instruction is malformed
]


def documents(data_dir, split):
    """The documents of a prepared split, decoded: the text between <|endoftext|> tokens."""
    meta = json.loads((data_dir / "meta.json").read_text())
    tok = tokenizer_from_meta(meta, str(data_dir))
    ids = np.fromfile(data_dir / f"{split}.bin", dtype=meta["dtype"]).tolist()
    return tok.decode(ids).split("<|endoftext|>")[:-1], meta


@pytest.fixture(scope="module")
def instruct_data(tmp_path_factory, hf_home):
    """The three ROWS as an archive-layout train.json (validation: the first row), prepared with --instruct and a
    small BPE vocabulary trained on them (no ../shared needed). Returns (folder, data_dir, prepare's stdout)."""
    folder = tmp_path_factory.mktemp("instruct")
    (folder / "train.json").write_text(json.dumps(ROWS))
    (folder / "validation.json").write_text(json.dumps(ROWS[:1]))
    data_dir = folder / "data"
    proc = run_script("prepare.py", f"--dataset={folder}", "--instruct", "--tokenizer=bpe", "--vocab_size=300",
                      f"--data_dir={data_dir}", "--num_proc=1", env={"HF_HOME": str(hf_home)})
    return folder, data_dir, proc.stdout


@pytest.fixture(scope="module")
def instruct_run(instruct_data, tmp_path_factory):
    """A tiny model trained 2 steps on instruct_data: its out_dir (sample.py and eval.py only read it)."""
    _, data_dir, _ = instruct_data
    out = tmp_path_factory.mktemp("instruct_run") / "out"
    run_script("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2",
               "--eval_interval=1", "--vocab_size=0", "--batch_size=2", "--block_size=16")
    return out


@pytest.mark.slow  # starts scripts as subprocesses
def test_prepare_instruct_layout(instruct_data):
    _, data_dir, out = instruct_data
    docs, meta = documents(data_dir, "train")
    assert docs == [
        "Words: play, ball, red\nFeatures: Dialogue\nSummary: Tom plays with a ball.\nStory:\n" + STORY_A,
        "Story:\n" + STORY_B,   # no instruction: the story alone after Story:
        "Story:\n" + STORY_C,   # malformed instruction: used without it, and said so
    ]
    assert meta["instruct"] is True
    assert "train: 2 of 3 rows used without instructions" in out
    assert "row 1: no instruction" in out


@pytest.mark.slow  # starts scripts as subprocesses
def test_prepare_without_instruct_is_unchanged(instruct_data, tmp_path, hf_home):
    folder, _, _ = instruct_data
    run_script("prepare.py", f"--dataset={folder}", "--tokenizer=bpe", "--vocab_size=300",
               f"--data_dir={tmp_path}", "--num_proc=1", env={"HF_HOME": str(hf_home)})
    docs, meta = documents(tmp_path, "train")
    assert docs == [STORY_A, STORY_B, STORY_C] and "instruct" not in meta


@pytest.mark.slow  # starts scripts as subprocesses
def test_header_bytes_are_the_same_in_sample_and_prepare(instruct_data, instruct_run, capsys):
    _, data_dir, _ = instruct_data
    proc = run_script("sample.py", f"--out_dir={instruct_run}", "--words=play, ball,red", "--features=Dialogue",
                      "--summary=Tom plays\nwith a ball.", "--start=", "--num_samples=1", "--max_new_tokens=1",
                      "--device=cpu")
    trained = documents(data_dir, "train")[0][0]
    prompt = trained[:trained.index("Story:\n") + len("Story:\n")]
    assert proc.stdout.startswith(prompt)
    assert "not trained with instructions" not in proc.stderr
    # a model trained without instructions gets the same header, and a note
    sample.words, sample.features, sample.summary = "play,ball,red", "Dialogue", "Tom plays with a ball."
    assert sample.instructed("Once", {"instruct": False}) == prompt + "Once"
    assert "not trained with instructions" in capsys.readouterr().err
    sample.words = sample.features = sample.summary = ""
    assert sample.instructed("Once", {}) == "Once"
    # serve.py's page fields build the same prompt
    fields = {"words": "play, ball,red", "features": "Dialogue", "summary": "Tom plays\nwith a ball."}
    assert serve.parse_request(urlencode({"prompt": "", **fields}), 1)["prompt"] == prompt
    assert serve.parse_request("prompt=Hi", 1)["prompt"] == "Hi"


@pytest.mark.slow  # starts scripts as subprocesses
def test_eval_instruct_report(instruct_run, tmp_path):
    out = instruct_run
    report, instructions = tmp_path / "eval.json", tmp_path / "instructions.json"
    instructions.write_text(json.dumps(ROWS[:2]))  # eval.py refuses a malformed row (see the end)
    run_script("eval.py", f"--out_dir={out}", f"--instruct={instructions}", "--num_samples=2",
               "--max_new_tokens=4", "--device=cpu", f"--report={report}", "--vocab_tokens=0")
    result = json.loads(report.read_text())
    ins = result["instruct"]
    assert ins["trained_with_instructions"] is True
    assert ins["words_required"] == 3  # row 0's three words; row 1 asks for none
    assert ins["Dialogue"]["asked"] == 1 and ins["Dialogue"]["not_asked"] == 1
    assert [s["prompt"] for s in result["samples"]] == [header(["play", "ball", "red"], ["Dialogue"],
                                                              "Tom plays with a ball."), "Story:\n"]
    # the reward rl.py trains on, each part the mean of instruct.reward over the stories
    expected = [reward(s["instruction"]["words"], s["text"], s["ended"]) for s in result["samples"]]
    assert ins["reward"] == {k: sum(e[k] for e in expected) / 2 for k in REWARD_PARTS}
    md = report.with_suffix(".md").read_text()
    assert "required words used" in md and "| # | words (**used**) |" in md
    assert "reward (rl.py's)" in md
    # a malformed instruction in the file: one line naming the file and the row, before the model is loaded
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([ROWS[0], {"story": "x", "instruction": {"words": [1, 2]}}]))
    proc = run_script("eval.py", f"--out_dir={out}", f"--instruct={bad}", "--device=cpu", check=False)
    assert_user_error(proc, "bad.json, row 1", "words holds int")


def test_inclusion_measure_on_hand_made_stories():
    story = "Tom JUMPED over the dogs. He was happier than the Cats, and he caught a catfish."
    assert uses("jump", story) and uses("dog", story) and uses("happy", story)
    assert uses("cat", story) and uses("catch", story)  # any case; irregular past (caught)
    assert not uses("cat", "She will catch the ball.")  # "cat" is not in "catch"
    assert not uses("fish", story)  # nor "fish" in "catfish"
    assert uses("stop", "It stopped.") and uses("dance", "They were dancing.") and uses("cry", "She cried.")
    assert uses("big", "The biggest box.") and uses("bring", "He brought it.") and uses("leaf", "Red leaves.")
    assert not uses("happy", "She smiled happily.")  # a derived word is another word
    assert uses("ice cream", "They ate ice creams.") and not uses("ice cream", "Ice and cream.")
    assert {"jump", "jumps", "jumped", "jumping"} <= forms("jump")


def test_features_and_summary_of_scores():
    assert has_feature("Dialogue", 'He said, "Hi!"') and has_feature("Dialogue", "\u201cHello,\u201d she said.")
    assert not has_feature("Dialogue", 'A "" pair of quotes, or none.')
    assert has_feature("BadEnding", "anything") is None  # not checkable from the text
    scores = [score(["dog", "run"], ["Dialogue"], 'The dog ran. "Woof!"', True),
              score(["cat", "big"], ["Dialogue", "BadEnding"], "A big dog.", False),
              score(["sun"], [], 'The sun said "hi". Suns shine; sunny days.', True)]  # "sunny" is another word
    assert scores[1]["asked"] == ["Dialogue"] and scores[2]["count"] == [2] and scores[0]["count"] == [1, 1]
    total = summarize(scores)
    assert (total["words_required"], total["words_used"]) == (5, 4) and total["word_share"] == 4 / 5
    assert total["uses_per_used_word"] == (1 + 1 + 1 + 2) / 4
    assert total["Dialogue"] == {"asked": 2, "not_asked": 1, "present_when_asked": 0.5,
                                 "present_when_not_asked": 1.0}


def test_header_and_instruction_files():
    assert header() == "Story:\n"
    assert header(["dog"], [], "") == "Words: dog\nStory:\n"
    assert header(" dog ", None, "A\n  dog.") == "Words: dog\nSummary: A dog.\nStory:\n"
    with pytest.raises(ValueError, match="comma"):
        header(["dog, cat"])
    rows = load_instructions("f.jsonl", '{"instruction": {"words": ["a"]}}\n\n{"story": "no instruction"}\n')
    assert rows == [{"words": ["a"], "features": [], "summary": None},
                    {"words": [], "features": [], "summary": None}]
    with pytest.raises(ValueError, match="f.json, row 0: instruction is not an object"):
        load_instructions("f.json", '[{"instruction": "words"}]')


def test_document_headers_finds_each_story_start_and_header_end():
    # ids: 9 is <|endoftext|>, (7, 8) the header's last line; the third document has no header
    stream = np.array([1, 2, 7, 8, 3, 4, 9, 7, 8, 5, 9, 6, 6, 9, 1, 7, 8])
    for chunk in (1 << 24, 4):  # read whole, and in chunks that split the (7, 8) pairs
        starts, ends = document_headers(stream, 9, [7, 8], chunk=chunk)
        assert starts.tolist() == [0, 7, 11, 14] and ends.tolist() == [4, 9, 11, 17]


@pytest.fixture(scope="module")
def stream():
    """Three documents: two with headers as prepare.py --instruct writes them, one story without any. Tokenized with
    GPT2_RANKS, which is GPT-2's vocabulary or conftest's stand-in: the tests below derive every count and position
    from this tokenizer, so they hold for either."""
    tok = load_tokenizer(str(GPT2_RANKS))
    docs = [header(["play", "ball", "red"], ["Dialogue"]) + STORY_A + " The ball was red and they play ball.",
            STORY_B, header(["shell"]) + STORY_C]
    ids = sum((tok.encode(d) + [tok.eot_token] for d in docs), [])
    return tok, np.array(ids, dtype=np.uint16), docs


def test_training_windows_hold_their_story_header(stream):
    tok, tokens, docs = stream
    windows = TrainingWindows(tokens, tok)
    head = tok.encode(header(["play", "ball", "red"], ["Dialogue"]))
    n = len(tok.encode(docs[0]))
    block = 2 * len(head) + 2
    later = [len(head) + 5, 3]  # inside the first story; inside its header
    x, y, w = windows(tokens, np.array(later), block)
    assert x[0, :len(head)].tolist() == head and (y[0, :len(head)] == -1).all()  # the header, its targets unscored
    assert x[0, len(head):].tolist() == tokens[later[0]:later[0] + block - len(head)].tolist()
    assert y[0, len(head):].tolist() == tokens[later[0] + 1:later[0] + 1 + block - len(head)].tolist()
    assert x[1].tolist() == tokens[:block].tolist() and y[1].tolist() == tokens[1:block + 1].tolist()
    assert (w == 1).all()
    # a story without a header: a plain window, to the end of the stream (the last start get_batch can draw)
    plain = n + 1 + 4
    rest = len(tokens) - 1 - plain
    x, y, _ = windows(tokens, np.array([plain]), rest)
    assert x[0].tolist() == tokens[plain:-1].tolist() and y[0].tolist() == tokens[plain + 1:].tolist()


def test_training_windows_weigh_the_asked_for_words_in_the_story(stream):
    tok, tokens, docs = stream
    windows = TrainingWindows(tokens, tok, word_weight=4.0)
    block = len(tokens) - 1
    x, y, w = windows(tokens, np.array([0]), block)  # every document in one natural window

    def asked_ids(words):
        return [tok.encode(" " + f)[0] for word in words for f in (word, word.capitalize())]

    def expected(words, start, header_end, end):
        """Weights of the targets y[0, start:end] (target j is stream token j + 1): 4 where it starts an asked-for
        word (" word" or " Word") after the header, else 1."""
        story = np.arange(start, end) + 1 >= header_end
        return np.where(story & np.isin(y[0, start:end], asked_ids(words)), 4.0, 1.0)

    def starts_of_asked(words, text):
        """How many words of `text` start with a token that starts an asked-for word: each word as GPT-2's
        pattern (and the stand-in's) cuts it, a letter run with the space before it, is tokenized on its own.
        Every use of the word itself is one; so is a longer word whose first token is the word's (" played" is
        " play" + "ed" in a small vocabulary, one token of its own in GPT-2's)."""
        return sum(tok.encode(piece)[0] in asked_ids(words) for piece in re.findall(r" ?[A-Za-z]+", text))

    second = len(tok.encode(docs[0])) + 1
    third = second + len(tok.encode(docs[1])) + 1
    story = docs[0][docs[0].index("Story:\n") + len("Story:\n"):]
    first = expected(["play", "ball", "red"], 0, len(tok.encode(header(["play", "ball", "red"], ["Dialogue"]))),
                     second)
    assert (w[0, :second] == first).all()
    # the story's uses, not the header's: its 7 uses of the words themselves (red 2, ball 3, play 2), and any longer
    # word that starts with one of their tokens
    assert (first == 4.0).sum() == starts_of_asked(["play", "ball", "red"], story) >= 7
    assert (w[0, second:third] == 1.0).all()  # no header, nothing asked
    last = expected(["shell"], third, third + len(tok.encode(header(["shell"]))), block)
    assert (w[0, third:] == last).all() and (last == 4.0).sum() == starts_of_asked(["shell"], STORY_C) >= 1


class CountingTokenizer:
    """A tokenizer that counts the texts it encodes (TrainingWindows needs eot_token, encode and decode)."""

    def __init__(self, tok):
        self.tok, self.eot_token, self.encoded = tok, tok.eot_token, 0

    def encode(self, text):
        self.encoded += 1
        return self.tok.encode(text)

    def decode(self, ids):
        return self.tok.decode(ids)


def test_training_windows_read_a_long_header_once(stream):
    tok = CountingTokenizer(stream[0])
    many = [f"word{i}" for i in range(1000)]  # far more than any story is asked to use
    docs = [header(many) + STORY_A + " word1 and word999.", header(["sun"]) + STORY_B]
    tokens = np.array(sum((tok.tok.encode(d) + [tok.eot_token] for d in docs), []), dtype=np.uint16)
    windows = TrainingWindows(tokens, tok, word_weight=4.0)
    story = len(tok.tok.encode(header(many) + STORY_A)) - 1  # targets from " word1" on, into the second story
    block = 16
    tok.encoded = 0
    windows(tokens, np.array([story]), block)
    once = tok.encoded
    for _ in range(5):  # more batches of more windows over the same two documents encode nothing more
        windows(tokens, np.array([story, story + 1, story + 2]), block)
    assert tok.encoded == once
    # and the one reading is bounded: only the first MAX_WORDS words are weighed, two forms of each
    assert once <= 2 * (TrainingWindows.MAX_WORDS + 1)
    x, y, w = windows(tokens, np.array([story]), block)
    first_word = tok.tok.encode(" word1")[0]
    assert (w[y == first_word] == 4.0).all() and (w == 4.0).any()


def test_header_chars_finds_a_prompt_header():
    text = header(["dog"], ["Dialogue"], "A dog.")
    assert header_chars(text + "Once") == len(text) and header_chars(text) == len(text)
    assert header_chars("Once upon a time") == 0 and header_chars("Once.\nStory:\nA") == 0
    assert header_chars("Story:\nA dog") == len("Story:\n")
    assert header_chars("Words: dog\nOnce upon a time") == 0  # no "Story:" line after the fields


def test_header_chars_when_a_field_ends_in_story():
    # header folds each field into one line, so a field that ends in "Story:" ends its own line, not the header
    for fields in ((["dog", "Story:"], None, None), (["dog"], ["Dialogue"], "The end of the Story:"),
                   (None, None, "Story:\nStory:")):
        text = header(*fields)
        assert header_chars(text + "Once upon a time") == len(text), text

"""prepare.py reads TinyStories as it is published: the V2 .txt files (stories between <|endoftext|> lines), the
hub's parquet folder, the JSON archive; and says in one line what is wrong with a bad input file."""
import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configurator import UserError
from conftest import (FORMATS, GPT2_RANKS, HAVE_SHARED_SAMPLE, SAMPLE, assert_user_error, needs_formats,
                      run_script)
from prepare import choose_column, load_splits, local_files, read_local

V2 = {"train": FORMATS / "TinyStoriesV2-GPT4-train.txt", "validation": FORMATS / "TinyStoriesV2-GPT4-valid.txt"}


def stories(split):
    """The stories of a split as the hub's parquet files hold them (the reference the other layouts must match)."""
    return pq.read_table(FORMATS / "hub" / "data" / f"{split}-00000-of-00001.parquet").column("text").to_pylist()


@pytest.fixture
def cache(hf_home, monkeypatch):
    """In-process `datasets` calls cache into the tests' private Hugging Face home."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(hf_home / "datasets"))


def v2_folder(tmp_path):
    """A folder holding the V2 files under their published names (links, not copies)."""
    folder = tmp_path / "v2"
    folder.mkdir()
    for path in V2.values():
        (folder / path.name).symlink_to(path)
    return folder


@needs_formats
def test_v2_text_is_split_on_endoftext_lines_only(cache, capsys):
    files, builder = local_files(str(V2["train"]))
    assert files == {"train": [str(V2["train"])]} and builder == "text"
    docs = read_local("train", files["train"], builder)["text"]
    assert docs == stories("train")  # one document per story, in order, as the hub has them
    assert len(docs) == 1000 and not any("<|endoftext|>" in d for d in docs)
    assert sum("\n\n" in d for d in docs) > 500  # paragraphs stay inside their story
    assert "documents split on lines holding only <|endoftext|>" in capsys.readouterr().out


def test_endoftext_rule_edges_and_compressed_text(tmp_path, cache, capsys):
    text = "A.\r\n\r\nA, part 2.\r\n<|endoftext|>\r\n<|endoftext|>  \r\n\r\nB.\n<|endoftext|>\nC, no separator after."
    (tmp_path / "train.txt.gz").write_bytes(gzip.compress(text.encode()))
    assert read_local("train", [str(tmp_path / "train.txt.gz")], "text")["text"] == [
        "A.\n\nA, part 2.", "B.", "C, no separator after."]  # empty runs between separators are no documents
    # a separator inside a line is text: the file keeps the blank-line rule
    (tmp_path / "plain.txt").write_text("One.\nStill one.\n\nTwo <|endoftext|> inline.\n")
    assert read_local("train", [str(tmp_path / "plain.txt")], "text")["text"] == [
        "One.\nStill one.", "Two <|endoftext|> inline.\n"]
    assert "plain.txt: documents split on blank lines" in capsys.readouterr().out
    # each file by its own rule, within one split
    both = read_local("train", [str(tmp_path / "plain.txt"), str(tmp_path / "train.txt.gz")], "text")["text"]
    assert both == ["One.\nStill one.", "Two <|endoftext|> inline.\n", "A.\n\nA, part 2.", "B.",
                    "C, no separator after."]


def test_checks_read_in_chunks_find_what_a_chunk_boundary_cuts(tmp_path, monkeypatch):
    import prepare
    monkeypatch.setattr(prepare, "_CHUNK", 4)
    path = tmp_path / "train.txt"
    path.write_bytes("Once.\n<|endoftext|>\nTwice.\n".encode())  # the separator line spans five reads
    assert prepare.check_text(str(path), "train")
    path.write_bytes("aaa\u00e9".encode() + b"\xff")  # the first read cuts the 2-byte \u00e9 (bytes 3-4)
    with pytest.raises(UserError, match="the byte at offset 5 "):
        prepare.check_text(str(path), "train")


def test_plain_text_keeps_the_blank_line_rule(cache):
    docs = read_local("train", [str(SAMPLE / "train.txt")], "text")["text"]
    assert [d for d in docs if d.strip()] == [
        b for b in (SAMPLE / "train.txt").read_text(encoding="utf-8").split("\n\n") if b.strip()]
    if HAVE_SHARED_SAMPLE:
        assert len([d for d in docs if d.strip()]) == 4662  # the shared sample's blank-line blocks


@needs_formats
def test_datasets_finds_files_and_splits(tmp_path, capsys):
    hub = FORMATS / "hub"
    assert local_files(str(hub)) == ({split: [str(hub / "data" / f"{split}-00000-of-00001.parquet")]
                                      for split in ("train", "validation")}, "parquet")
    folder = v2_folder(tmp_path)
    assert local_files(str(folder)) == ({split: [str(folder / V2[split].name)] for split in V2}, "text")
    assert local_files(str(FORMATS / "all_data")) == ({"train": [str(FORMATS / "all_data" / "data00.json")]}, "json")

    shards = tmp_path / "shards" / "data"
    shards.mkdir(parents=True)
    for name in ("train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl", "validation-00000-of-00001.jsonl",
                 "test-00000-of-00001.jsonl"):
        (shards / name).write_text('{"text": "A story."}\n')
    files, builder = local_files(str(shards.parent))
    assert builder == "json" and files == {
        "train": [str(shards / "train-00000-of-00002.jsonl"), str(shards / "train-00001-of-00002.jsonl")],
        "validation": [str(shards / "validation-00000-of-00001.jsonl")]}
    assert "not read" in capsys.readouterr().out  # the test shard

    named = tmp_path / "named"
    for name in ("training/a.txt", "training/b.txt", "dev/c.txt", "test.txt", "notes.txt"):
        (named / name).parent.mkdir(parents=True, exist_ok=True)
        (named / name).write_text("A story.\n")
    assert local_files(str(named)) == ({"train": [str(named / "training/a.txt"), str(named / "training/b.txt")],
                                        "validation": [str(named / "dev/c.txt")]}, "text")
    assert "notes.txt, test.txt" in capsys.readouterr().out  # what was left out is said, not silently dropped


def test_text_column_choice(capsys):
    import datasets
    archive = datasets.Dataset.from_dict({"story": ["s"], "summary": ["t"], "source": ["GPT-4"], "n": [1]})
    assert choose_column({"train": archive}, "text", "src") == "story"
    assert capsys.readouterr().out == ("no 'text' column in src: reading the 'story' column (TinyStories' name for "
                                       "the text); pass --text_column=NAME to choose another\n")
    only = datasets.Dataset.from_dict({"body": ["s"]})
    assert choose_column({"train": only}, "text", "src") == "body"
    assert "no 'text' column in src: reading 'body', its only column" in capsys.readouterr().out
    # by name, never by type: one text column among others is not a reason to read it
    several = datasets.Dataset.from_dict({"body": ["s"], "n": [1], "tags": [["a"]]})
    with pytest.raises(UserError, match=r"no column 'text' in its train split \(columns: body, n, tags\)"):
        choose_column({"train": several}, "text", "src")
    assert choose_column({"train": archive}, "summary", "src") == "summary"  # asked for: taken as it is
    hub = datasets.Dataset.from_dict({"text": ["a", None, "c"]})  # no local files: the row of the split
    with pytest.raises(UserError, match=r"^the train split of src, row 2: the 'text' value is missing \(null\), "
                                        r"not text"):
        choose_column({"train": hub}, "text", "src")
    two = datasets.Dataset.from_dict({"title": ["t"], "body": ["b"]})
    with pytest.raises(UserError, match=r"no column 'text' in its train split \(columns: title, body\)"):
        choose_column({"train": two}, "text", "src")
    with pytest.raises(UserError, match="no column 'story' in its validation split"):
        choose_column({"train": archive, "validation": two}, "story", "src")


@needs_formats
def test_json_archive_reads_its_story_column(cache, capsys):
    splits, column = load_splits(str(FORMATS / "all_data"), "text")
    assert column == "story" and "reading the 'story' column (TinyStories' name for the text)" in \
        capsys.readouterr().out
    assert len(splits["train"]) + len(splits["validation"]) == 1000  # the archive has no validation split
    assert sorted([*splits["train"]["story"], *splits["validation"]["story"]]) == sorted(stories("train"))


def write_parquet(path, column):
    pq.write_table(pa.table({"text": column}), path)


# (case, files to write {name: bytes or a function of the path}, fragments of the message; {dir}: the folder)
BAD = [
    ("empty_file", {"train.txt": b""}, ["train.txt (the train split) is empty"]),
    ("blank_validation", {"train.txt": b"A story.\n", "validation.txt": b"\n \n\n"},
     ["validation.txt (the validation split) is empty"]),
    ("not_utf8", {"train.txt": b"Story one.\n\nStory two caf\xc3\xa9.\n\nBad \xff here.\n"},
     ["train.txt is not UTF-8 text: the byte at offset 34 (b'\\xff')"]),
    ("not_utf8_compressed", {"train.jsonl.gz": gzip.compress(b'{"text": "caf\xe9"}\n')},
     ["train.jsonl.gz is not UTF-8 text: the byte at offset 13 of the uncompressed text"]),
    ("gzip_named_txt", {"train.txt": gzip.compress(b"A story.\n")},
     ["train.txt is not UTF-8 text: the byte at offset 1", "looks gzip-compressed: name it train.txt.gz"]),
    ("not_gzip", {"train.txt.gz": b"A story.\n\nAnother.\n"}, ["train.txt.gz is not a valid .gz file"]),
    ("truncated_gzip", {"train.txt.gz": gzip.compress(b"A story.\n" * 1000)[:-10]},
     ["train.txt.gz is not a valid .gz file", "truncated, corrupt or not compressed?"]),
    ("not_bzip2", {"train.jsonl.bz2": b'{"text": "A story."}\n'}, ["train.jsonl.bz2 is not a valid .bz2 file"]),
    ("json_numbers", {"train.jsonl": b'{"text": 1}\n{"text": 2}\n'},
     ["column 'text' of the train split ({dir}/train.jsonl) holds int64 values, not text", "--text_column=NAME"]),
    ("json_lists", {"train.json": b'[{"text": ["a", "b"]}, {"text": ["c"]}]'},
     ["({dir}/train.json) holds list values, not text"]),
    ("json_mixed", {"train.jsonl": b'{"text": "a"}\n{"text": 2}\n'},
     ["{dir}/train.jsonl line 2: the 'text' value is int 2, not text; fix or remove that row"]),
    ("json_empty_array", {"train.json": b"[]\n"}, ["train.json (the train split) is empty"]),
    ("parquet_no_rows", {"train.parquet": lambda p: write_parquet(p, pa.array([], pa.string()))},
     ["train.parquet (the train split) is empty: it has no rows"]),
    ("parquet_numbers", {"train.parquet": lambda p: write_parquet(p, [1, 2])}, ["holds int64 values, not text"]),
    ("not_parquet", {"data/train-00000-of-00001.parquet": b"PAR1 this is not parquet"},
     ["data/train-00000-of-00001.parquet is not a Parquet file"]),
    ("archive", {"TinyStories_all_data.tar.gz": b"\x1f\x8b"}, ["TinyStories_all_data.tar.gz is an archive: unpack it"]),
    ("mixed_types", {"train.txt": b"A story.\n", "validation.jsonl": b'{"text": "A story."}\n'},
     ["mixes file types (json, text)"]),
]


@pytest.mark.parametrize("case,files,fragments", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_naming_the_file(case, files, fragments, tmp_path, cache):
    folder = tmp_path / "stories"
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        content(folder / name) if callable(content) else (folder / name).write_bytes(content)
    with pytest.raises(UserError) as info:
        load_splits(str(folder), "text")
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment.format(dir=folder) in message, message


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, hf_home):
    """Each published layout prepared with the GPT-2 ranks; returns {layout: (data_dir, stdout)}."""
    tmp = tmp_path_factory.mktemp("formats")
    layouts = {"v2_folder": v2_folder(tmp), "hub": FORMATS / "hub", "v2_file": V2["train"],
               "json_archive": FORMATS / "all_data"}
    out = {}
    for layout, source in layouts.items():
        proc = run_script("prepare.py", f"--dataset={source}", f"--tokenizer={GPT2_RANKS}",
                          f"--data_dir={tmp / layout}", "--num_proc=1", env={"HF_HOME": str(hf_home)})
        out[layout] = (tmp / layout, proc.stdout)
    return out


@pytest.mark.slow
@needs_formats
def test_every_layout_gives_the_stories_and_the_same_tokens(prepared):
    from tokenizer import load_tokenizer
    tok = load_tokenizer(str(GPT2_RANKS))
    meta = {layout: json.loads((d / "meta.json").read_text()) for layout, (d, _) in prepared.items()}
    for split, n in (("train", 1000), ("validation", 97)):
        docs = stories(split)
        expected = {"documents": n, "tokens": sum(len(ids) + 1 for ids in tok.encode_batch(docs)),
                    "bytes": sum(len(d.encode("utf-8")) for d in docs)}
        assert len(docs) == n
        for layout in ("v2_folder", "hub"):
            assert meta[layout]["splits"][split] == expected, layout
        assert (prepared["v2_folder"][0] / f"{split}.bin").read_bytes() == \
            (prepared["hub"][0] / f"{split}.bin").read_bytes()
    # one file, or the archive (train only): the same 1,000 stories, the same 5 held out by the seed
    for layout in ("v2_file", "json_archive"):
        counts = meta[layout]["splits"]
        assert (counts["train"]["documents"], counts["validation"]["documents"]) == (995, 5)
        assert counts["train"]["tokens"] + counts["validation"]["tokens"] == meta["hub"]["splits"]["train"]["tokens"]
    for split in ("train", "validation"):
        assert (prepared["v2_file"][0] / f"{split}.bin").read_bytes() == \
            (prepared["json_archive"][0] / f"{split}.bin").read_bytes()
    tokens = np.fromfile(prepared["hub"][0] / "train.bin", dtype=np.uint16)
    assert int((tokens == tok.eot_token).sum()) == 1000
    assert "documents split on lines holding only <|endoftext|>" in prepared["v2_folder"][1]
    assert "reading the 'story' column" in prepared["json_archive"][1]


@pytest.mark.slow
def test_bad_input_from_the_command_line(tmp_path, hf_home):
    (tmp_path / "stories").mkdir()
    (tmp_path / "stories" / "train.txt").write_bytes(b"A story.\n\nBad \xff byte.\n")
    proc = run_script("prepare.py", f"--dataset={tmp_path}/stories", f"--tokenizer={GPT2_RANKS}",
                      f"--data_dir={tmp_path}/d", check=False, env={"HF_HOME": str(hf_home)})
    assert_user_error(proc, "train.txt is not UTF-8 text: the byte at offset 14")
    assert not (tmp_path / "d").exists()


# --- one bad row, a byte-order mark --------------------------------------------------------------------------------

def story_rows(bad):
    """The red team's rows: stories with their source, one of them `bad` (its "story" not text) as the third."""
    rows = [{"story": f"Story {i}.", "source": "derived"} for i in range(6)]
    rows[2] = bad
    return rows


@pytest.mark.parametrize("layout", ["jsonl", "json"])
@pytest.mark.parametrize("bad,value", [({"story": 5, "source": "derived"}, "int 5"),
                                       ({"story": ["a", "b"], "source": "derived"}, "list ['a', 'b']"),
                                       ({"source": "derived"}, "missing (null)")])
def test_one_bad_row_is_refused_never_a_switch_of_column(tmp_path, cache, layout, bad, value, capsys):
    folder = tmp_path / "stories"
    folder.mkdir()
    rows = story_rows(bad)
    path = folder / f"train.{layout}"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if layout == "jsonl" else json.dumps(rows))
    with pytest.raises(UserError) as info:
        load_splits(str(folder), "text")
    place = f"{path} line 3" if layout == "jsonl" else f"{path} row 3"
    assert str(info.value) == (f"{place}: the 'story' value is {value}, not text; fix or remove that row, or "
                               f"choose another column with --text_column=NAME")
    assert "reading the 'story' column" in capsys.readouterr().out  # by its name, not by which columns hold text
    # without the bad row: the stories, not the "source" column
    path.write_text(json.dumps(rows[:2] + rows[3:]))
    splits, column = load_splits(str(folder), "text")
    assert column == "story" and sorted([*splits["train"]["story"], *splits["validation"]["story"]]) == [
        f"Story {i}." for i in (0, 1, 3, 4, 5)]


@pytest.mark.slow  # prepare.py as a subprocess
def test_one_bad_row_from_the_command_line(tmp_path, hf_home):
    folder = tmp_path / "stories"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in story_rows({"story": 5,
                                                                                        "source": "derived"})))
    proc = run_script("prepare.py", f"--dataset={folder}", f"--tokenizer={GPT2_RANKS}", f"--data_dir={tmp_path}/d",
                      check=False, env={"HF_HOME": str(hf_home)})
    assert_user_error(proc, "train.jsonl line 3: the 'story' value is int 5, not text")
    assert not (tmp_path / "d").exists()


BOM = b"\xef\xbb\xbf"  # what Windows editors write first in a UTF-8 file


@pytest.mark.parametrize("name,content", [
    ("train.txt", b"Once upon a time.\n\nThe end."),
    ("train.txt.gz", gzip.compress(BOM + b"Once upon a time.\n<|endoftext|>\nThe end.\n", mtime=0)),
    ("train.jsonl", b'{"text": "Once upon a time."}\n{"text": "The end."}\n'),
    ("train.json", b'[{"text": "Once upon a time."}, {"text": "The end."}]'),
], ids=["txt", "txt.gz", "jsonl", "json"])
def test_a_byte_order_mark_is_not_story_text(tmp_path, cache, name, content):
    path = tmp_path / name
    path.write_bytes(content if name.endswith(".gz") else BOM + content)
    docs = load_splits(str(path), "text")[0]
    assert sorted([*docs["train"]["text"], *docs["validation"]["text"]]) == ["Once upon a time.", "The end."]


def test_a_byte_order_mark_keeps_the_byte_offsets_of_the_file(tmp_path):
    import prepare
    path = tmp_path / "train.txt"
    path.write_bytes(BOM + b"ab\xff")
    with pytest.raises(UserError, match="the byte at offset 5 "):  # offsets count the file's bytes, mark included
        prepare.check_text(str(path), "the train split")
    path.write_bytes(BOM)
    with pytest.raises(UserError, match=r"\(the train split\) is empty"):
        prepare.check_text(str(path), "the train split")

"""The docs name only what exists. Every `module.name` (or `module.Class.method`) that README.md and docs/*.md
write in backticks, where `module` is one of this repository's top-level scripts, is defined in that module's
source; every repository file they mention or link (tests/test_x.py, config/x.py, docs/x.md, dev/x.md,
notebooks/x.ipynb, a top-level x.py) is there. The dated logs in dev/ describe the code as it was on their dates,
so only their links are checked. The sources are read with ast, nothing is imported: this takes well under a
second."""
import ast
import re
from functools import cache

import pytest

from conftest import ROOT

MODULES = sorted(p.stem for p in ROOT.glob("*.py"))  # model, train, fast, plumbing, ...
REFERENCE = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LOGS = sorted((ROOT / "dev").glob("*.md"))

# `train.bin`, `meta.json`, `model.safetensors`: file names whose stem happens to be a module's name
FILE_EXTENSIONS = {"py", "md", "ipynb", "bin", "json", "jsonl", "csv", "txt", "pt", "png", "html", "safetensors",
                   "tiktoken", "gz", "parquet", "toml", "lock", "tmp", "gguf"}
# names the docs use as examples of a mistake: they must stay missing
EXAMPLES = {"config/nope.py", "bad.py"}

REF = re.compile(rf"(?<![\w./-])({'|'.join(MODULES)})\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?")
FOLDER_PATH = re.compile(r"(?<![\w./-])((?:tests|config|docs|dev|notebooks|assets)/[\w.-]*\w)")
BARE_FILE = re.compile(r"(?<![\w./-])([\w-]+\.(?:py|md|ipynb))(?![\w-])")
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def top_level(body):
    """The statements of a module's top level, including those inside top-level if/try blocks."""
    for node in body:
        if isinstance(node, (ast.If, ast.Try)):
            yield from top_level(node.body + node.orelse + getattr(node, "finalbody", [])
                                 + [s for h in getattr(node, "handlers", []) for s in h.body])
        else:
            yield node


def assigned_names(node):
    """The names an assignment statement binds (a, b = ...; x: int = ...)."""
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def class_members(cls):
    """A class's methods, nested classes, class attributes and the attributes its methods set on self."""
    members = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            members.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            members |= assigned_names(node)
    for node in ast.walk(cls):
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name)
                and node.value.id == "self"):
            members.add(node.attr)
    return members


@cache
def definitions(module):
    """{name: members} of what `module`.py defines at its top level (functions, classes, assigned names; imported
    names are not counted: the docs point to a name's owner). Members: a class's (class_members), else empty."""
    tree = ast.parse((ROOT / f"{module}.py").read_text(encoding="utf-8"))
    names = {}
    for node in top_level(tree.body):
        if isinstance(node, ast.ClassDef):
            names[node.name] = class_members(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = set()
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            names.update(dict.fromkeys(assigned_names(node), set()))
    return names


def wrong_names(text):
    """The backticked `module.name` and `module.Class.member` references of a Markdown text that do not exist."""
    wrong = []
    for span in CODE_SPAN.findall(FENCE.sub("", text)):
        for module, name, member in REF.findall(span):
            if name in FILE_EXTENSIONS:
                continue  # a file: `train.bin`, `model.py`
            defined = definitions(module)
            if name not in defined:
                wrong.append(f"{module}.{name}: {module}.py defines no {name}")
            elif member and defined[name] and member not in defined[name] and member not in FILE_EXTENSIONS:
                wrong.append(f"{module}.{name}.{member}: {module}.{name} has no {member}")
    return wrong


def file_exists(path, doc):
    """Whether a file the Markdown file `doc` mentions by `path` exists: from the repository root; a bare
    test_x.py in tests/; a bare config name (tinystories_cpu.py) in config/; a bare x.md or x.ipynb beside doc."""
    candidates = [ROOT / path, doc.parent / path]
    if "/" not in path:
        candidates += [ROOT / "tests" / path, ROOT / "config" / path]
    return any(p.exists() for p in candidates)


def missing_files(text, doc, mentions=True):
    """The repository files that a Markdown text links (relative to `doc`) or, with mentions, names, and that do not
    exist."""
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor of this page
        path = target.split("#")[0]
        if path and not (doc.parent / path).exists():
            missing.append(f"link to {target}")
    if mentions:
        for path in FOLDER_PATH.findall(text) + BARE_FILE.findall(text):
            if path in EXAMPLES or re.fullmatch(r"[A-Z_]+\.\w+", path):
                continue  # an example of a mistake, or a placeholder (SCRIPT.py)
            if not file_exists(path, doc):
                missing.append(path)
    return missing


@pytest.mark.parametrize("doc", REFERENCE, ids=[p.name for p in REFERENCE])
def test_reference_names_exist(doc):
    assert wrong_names(doc.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("doc", REFERENCE, ids=[p.name for p in REFERENCE])
def test_reference_files_exist(doc):
    assert missing_files(doc.read_text(encoding="utf-8"), doc) == []


@pytest.mark.parametrize("doc", LOGS, ids=[p.name for p in LOGS])
def test_log_links_resolve(doc):
    assert missing_files(doc.read_text(encoding="utf-8"), doc, mentions=False) == []


def test_examples_stay_missing():
    assert [p for p in EXAMPLES if (ROOT / p).exists()] == []


def test_the_checks_catch_wrong_references():
    doc = ROOT / "docs" / "planted.md"
    wrong = ("`model.resolve_device` `optim.clip_and_step(model, opt)` `fast.FastGPT.nowhere` `plumbing.nothing`\n"
             "tests/test_fused.py, `config/tinystories_9m.py`, [gone](gone.md), notebooks/none.ipynb, `nope.py`\n")
    assert len(wrong_names(wrong)) == 3
    assert len(missing_files(wrong, doc)) == 5
    right = ("`torch.compile` `meta.json` `train.bin` `log.csv` `model.py` `eval.py --compare=a.json`\n"
             "`configurator.resolve_device(device, dtype)` `fast.speed_up` `plumbing.StepGuard.step_is_sound`\n"
             "`model.GPT.loss` `plumbing.Setup.cfg` `model.SAMPLING_DEFAULTS` `model.safetensors` `x.model.nope`\n"
             "```\npython -c 'import model; model.nothing'\n```\n"
             "[recipe](recipe.md), tests/test_fast.py, `tinystories_cpu.py`, `config/nope.py`, `SCRIPT.py`\n")
    assert wrong_names(right) == []
    assert missing_files(right, doc) == []

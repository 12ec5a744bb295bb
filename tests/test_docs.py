"""The docs name only what exists. Every `module.name` (or `module.Class.member`) that README.md and docs/*.md write
in backticks, where `module` is one of this repository's top-level scripts, is defined in that module's source;
every repository file they mention or link (tests/test_x.py, config/x.py, docs/x.md, dev/x.md, notebooks/x.ipynb,
a top-level x.py) is there. The dated logs in dev/ describe the code as it was on their dates, so only their links
are checked. The sources are parsed with ast, nothing is imported: the whole file takes about a second."""
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
# names the docs give as examples of a mistake: they must stay missing
EXAMPLES = {"config/nope.py", "bad.py"}

# `model.GPT.logits_and_loss`, `fast.speed_up(model)`; not `torch.compile`, `x.model.eval`, `data/sample.txt`
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


def own_members(cls):
    """A class's own methods, nested classes, class attributes and the attributes its methods set on self."""
    found = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            found |= assigned_names(node)
    for node in ast.walk(cls):
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name)
                and node.value.id == "self"):
            found.add(node.attr)
    return found


@cache
def parsed(module):
    """What `module`.py defines at its top level, {name: its ClassDef, or None for a function or an assigned name},
    and what it imports from the repository's modules, {name: module}."""
    tree = ast.parse((ROOT / f"{module}.py").read_text(encoding="utf-8"))
    defined, imported = {}, {}
    for node in top_level(tree.body):
        if isinstance(node, ast.ClassDef):
            defined[node.name] = node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defined[node.name] = None
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            defined.update(dict.fromkeys(assigned_names(node)))
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES:
            imported.update({a.asname or a.name: node.module for a in node.names})
    return defined, imported


def members(module, cls):
    """The members of class `cls` of `module`: its own and those of its bases defined in this repository (FastGPT's
    include GPT's). Members inherited from elsewhere (nn.Module's) are not counted."""
    defined, imported = parsed(module)
    found = own_members(defined[cls])
    for base in defined[cls].bases:
        if isinstance(base, ast.Name):
            owner = module if base.id in defined else imported.get(base.id)
            if owner is not None and isinstance(parsed(owner)[0].get(base.id), ast.ClassDef):
                found |= members(owner, base.id)
    return found


def wrong_names(text):
    """The backticked `module.name` and `module.Class.member` references of a Markdown text that name nothing.
    `name` must be defined at the top level of module.py (a function, a class or an assigned name; an imported name
    does not count: the docs point to a name's owner), and `member`, after a class, must be one of its members."""
    wrong = []
    for span in CODE_SPAN.findall(FENCE.sub("", text)):
        for module, name, member in REF.findall(span):
            if name in FILE_EXTENSIONS:
                continue  # a file: `train.bin`, `model.py`
            defined, _ = parsed(module)
            if name not in defined:
                wrong.append(f"{module}.{name}")
            elif (member and member not in FILE_EXTENSIONS and isinstance(defined[name], ast.ClassDef)
                  and member not in members(module, name)):
                wrong.append(f"{module}.{name}.{member}")
    return wrong


def file_exists(path, doc):
    """Whether a file that the Markdown file `doc` names by `path` exists: from the repository root or beside doc;
    a bare test_x.py in tests/, a bare config name (tinystories_cpu.py) in config/."""
    candidates = [ROOT / path, doc.parent / path]
    if "/" not in path:
        candidates += [ROOT / "tests" / path, ROOT / "config" / path]
    return any(p.exists() for p in candidates)


def missing_files(text, doc, mentions=True):
    """The repository files that a Markdown text links (relative to `doc`) or, with mentions, names anywhere, and
    that do not exist."""
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address, or an anchor of this page
        path = target.split("#")[0]
        if not (doc.parent / path).exists():
            missing.append(target)
    if mentions:
        for path in FOLDER_PATH.findall(text) + BARE_FILE.findall(text):
            if path in EXAMPLES or re.fullmatch(r"[A-Z_]+\.\w+", path):
                continue  # an example of a mistake, or a placeholder (SCRIPT.py)
            if not file_exists(path, doc):
                missing.append(path)
    return list(dict.fromkeys(missing))  # a link's target is a mention too: once each


@pytest.mark.parametrize("doc", REFERENCE, ids=[p.name for p in REFERENCE])
def test_the_names_the_docs_give_exist(doc):
    assert wrong_names(doc.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("doc", REFERENCE, ids=[p.name for p in REFERENCE])
def test_the_files_the_docs_name_exist(doc):
    assert missing_files(doc.read_text(encoding="utf-8"), doc) == []


@pytest.mark.parametrize("doc", LOGS, ids=[p.name for p in LOGS])
def test_the_links_of_the_logs_resolve(doc):
    assert missing_files(doc.read_text(encoding="utf-8"), doc, mentions=False) == []


def test_the_examples_of_mistakes_stay_missing():
    assert [p for p in EXAMPLES if (ROOT / p).exists()] == []


def test_wrong_references_are_caught_and_others_are_not():
    doc = ROOT / "docs" / "planted.md"
    wrong = ("`model.resolve_device` `optim.clip_and_step(model, opt)` `fast.FastGPT.nowhere` `plumbing.nothing`\n"
             "tests/test_fused.py, `config/tinystories_9m.py`, [gone](gone.md), notebooks/none.ipynb, `nope.py`\n")
    assert wrong_names(wrong) == ["model.resolve_device", "optim.clip_and_step", "fast.FastGPT.nowhere",
                                  "plumbing.nothing"]
    assert missing_files(wrong, doc) == ["gone.md", "tests/test_fused.py", "config/tinystories_9m.py",
                                         "notebooks/none.ipynb", "nope.py"]
    right = ("`torch.compile` `meta.json` `train.bin` `log.csv` `model.py` `eval.py --compare=a.json`\n"
             "`configurator.resolve_device(device, dtype)` `fast.speed_up` `plumbing.StepGuard.step_is_sound`\n"
             "`model.GPT.logits_and_loss` `fast.FastGPT.generate` `plumbing.Setup.cfg` `model.SAMPLING_DEFAULTS`\n"
             "`x.model.nope`\n"
             "```\npython -c 'import model; model.nothing'\n```\n"
             "[recipe](recipe.md), tests/test_fast.py, `tinystories_cpu.py`, `config/nope.py`, `SCRIPT.py`, a/x.md\n")
    assert wrong_names(right) == []
    assert missing_files(right, doc) == []

"""Command-line configuration shared by every script in this repository.

Each script assigns its settings as plain top-level variables in one block between two lines of dashes (its
settings block), then calls `configure(globals())`. Those names, and no others, are its settings: the script's
constants, imported names and functions are never settings.

    python train.py config/tinystories_15m.py --batch_size=16 --device=cpu

- A positional argument is a Python config file. It is executed, and its top-level names override the
  script's defaults. Config files are ordinary Python and run with your permissions: only use ones you trust.
- `--key=value` overrides one value; a bare `--key` turns an on/off (bool) setting on. The value is parsed as a
  Python literal (`3`, `1e-3`, `True`, `'x'`),
  and if that fails it is taken as a plain string (`--device=cpu`).
- Every value must have the type of its default; an int is accepted where a float is expected.
- `--help` lists every key with its default.

Mistakes (unknown key, wrong type, missing or broken config file) raise `UserError`. Scripts run their
`main()` through `run()`, which turns a `UserError` into one line on stderr and exit code 2.

It also turns the settings every script shares into concrete choices: `resolve_device` (device and precision),
`autocast`, and `read_text` for a text file named on the command line.
"""

import ast
import codecs
import difflib
import math
import os
import sys
import traceback

import io
import tokenize

import torch

from errors import UserError  # noqa: F401 (the scripts import it from here with configure and run)
from files import read_input_bytes


def run(main):
    """Call `main()`; a `UserError` becomes `error: <message>` on stderr and exit code 2, with no traceback;
    Ctrl-C becomes `interrupted` and exit code 130; a reader of stdout that went away (`| head -1`) ends it
    quietly with exit code 141, as SIGPIPE ends other tools. An operation that Apple's MPS backend lacks in this PyTorch
    (NotImplementedError naming MPS) gets the same treatment, with the fallback to the CPU as the fix."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NotImplementedError as e:
        if "MPS" not in str(e):
            raise
        print(f"error: this PyTorch has no Apple MPS version of an operation ({str(e).splitlines()[0]}): run "
              f"with PYTORCH_ENABLE_MPS_FALLBACK=1 to compute it on the CPU, update PyTorch, or use --device=cpu",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as e:
        if not _peer_died(e):
            raise
        print(f"error: another process of this torchrun run stopped, and with it the connection to this one "
              f"({str(e).splitlines()[0][:160]}); its own output says why. Continue from the last checkpoint with "
              f"the same torchrun command and --init_from=resume", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # The reader of stdout has gone (`python sample.py | head -1`): stop quietly, as command-line tools do,
        # with the status of a process ended by SIGPIPE (128 + 13). Python would flush stdout again on exit and
        # complain, so stdout now goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)


def _peer_died(error):
    """Whether `error` is a process group's collective failing because another process went away (killed, out of
    memory, its torchrun agent stopped): gloo and NCCL report a connection reset or closed by the peer."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return False
    text = str(error)
    lost = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator")
    return isinstance(error, getattr(dist, "DistBackendError", ())) or any(s in text for s in lost)


def _stdout_closed():
    """Whether stdout is a pipe or socket whose reader has gone (poll reports an error or hang-up on it)."""
    try:
        import select
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows) or no real stdout: assume it was stdout
        return True


SETTINGS_RULE = "# " + "-" * 20  # a settings block starts and ends with a comment line that begins so


def settings_block(path):
    """The names a script's settings block assigns, in order: the top-level assignments between the first two
    comment lines of dashes (SETTINGS_RULE) of the source file at `path`, which come before its first function or
    class. Raises RuntimeError (a bug in the script, not the user's mistake) when the file cannot be read, has no
    such block, or holds a statement in it that is not `name = value`."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError as e:
        raise RuntimeError(f"cannot read the settings block of {path}: {e}") from None
    body = ast.parse(source).body
    first_def = min([n.lineno for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))], default=math.inf)
    rules = [n for n, line in enumerate(source.splitlines(), 1) if line.startswith(SETTINGS_RULE) and n < first_def]
    if len(rules) < 2:
        raise RuntimeError(f"{path} has no settings block (two lines starting with {SETTINGS_RULE!r} before its "
                           f"first function)")
    block = [node for node in body if rules[0] < node.lineno < rules[1]]
    odd = [node.lineno for node in block if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                                                 and isinstance(node.targets[0], ast.Name))]
    if odd:
        raise RuntimeError(f"{path} line {odd[0]}: a settings block holds only `name = value` lines")
    return [node.targets[0].id for node in block]


def _configurable(defaults):
    """A script's settings and their defaults: the names of its settings block when `defaults` is a module's
    globals (they hold `__name__`), or every entry of a plain dict of settings. Raises RuntimeError for globals
    without the `__file__` the block is read from (a script run by exec)."""
    if "__name__" not in defaults:
        return dict(defaults)
    if "__file__" not in defaults:
        raise RuntimeError("configure(globals()) reads the settings block from the script's file: run it as a file")
    return {k: defaults[k] for k in settings_block(defaults["__file__"])}


def _check_type(key, value, default, where):
    """Raise UserError unless `value` may replace `default` (same type; int is accepted for float)."""
    if type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    raise UserError(f"{where}: {key} must be {type(default).__name__} like its default {default!r}, "
                    f"got {type(value).__name__} {value!r}")


def _unknown(key, known, where):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else "; run with --help to list the keys"
    return UserError(f"{where}: unknown key {key!r}{hint}")


def _setting_comments(path):
    """{setting: its comment} from a script's source (the file at `path`): the comment at the end of the line that
    assigns the setting at the top level. {} when the source cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, TypeError):
        return {}
    comments, line_comment = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line_comment[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            col, text = line_comment.get(node.lineno, (None, None))
            if col is not None and col > 0:
                comments[node.targets[0].id] = text
    return comments


def configure(defaults, argv=None, doc=None):
    """Override a script's default settings from config files and `--key=value` flags.

    Args:
        defaults: the script's `globals()`, whose settings are the names of its settings block (settings_block),
            updated in place; or a plain dict whose entries are all settings.
        argv: the arguments, `sys.argv[1:]` when None.
        doc: text printed above the key list for `--help` (the script's docstring).
    Returns:
        dict of every setting after overrides, in definition order (print it, store it in checkpoints).
    Raises:
        UserError: unknown key (with the closest known key), wrong type, missing or failing config file,
            an argument that is neither a file nor `--key=value`, or a text value that is not valid UTF-8
            (check_utf8: checked before anything is printed or written).
    """
    argv = sys.argv[1:] if argv is None else argv
    known = _configurable(defaults)
    if "--help" in argv or "-h" in argv:
        if doc:
            print(doc.strip() + "\n")
        print("settings (override with a config file or --key=value):")
        comments = _setting_comments(defaults.get("__file__"))
        width = max(len(f"--{k}={v!r}") for k, v in known.items())
        for k, v in known.items():
            flag = f"--{k}={v!r}"
            print(f"  {flag:<{width}}  {comments[k]}" if comments.get(k) else f"  {flag}")
        sys.exit(0)

    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise UserError(f"config file {arg!r} not found (arguments are config files or --key=value)")
            scope = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), scope)
            except Exception as e:  # a broken config file is the user's mistake, not a bug here
                frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == arg]
                line = frames[-1].lineno if frames else getattr(e, "lineno", None)
                raise UserError(f"config file {arg} failed{f' at line {line}' if line else ''}: "
                                f"{type(e).__name__}: {e}") from None
            for k, v in scope.items():
                if k.startswith("_") or callable(v) or type(v).__name__ == "module":
                    continue  # imports and helper functions of the config file
                if k not in known:
                    raise _unknown(k, known, arg)
                check_utf8(f"{arg}: {k}", v)
                known[k] = _check_type(k, v, known[k], arg)
        else:
            key, sep, text = arg[2:].partition("=")
            if key not in known:
                raise _unknown(key, known, arg)
            check_utf8(f"--{key}", text)  # before anything prints or writes it
            if not sep:
                if type(known[key]) is not bool:
                    raise UserError(f"{arg}: flags take the form --key=value (a bare --{key} is only for on/off "
                                    f"settings)")
                text = "True"  # --force means --force=True
            try:
                value = ast.literal_eval(text)
            except Exception:  # not a Python literal: a plain string
                value = text
            if isinstance(known[key], str) and not isinstance(value, str):
                value = text  # --start=123 means the text "123" for a string setting
            check_utf8(f"--{key}", value)  # '"\\udcff"' is a literal of a lone surrogate
            known[key] = _check_type(key, value, known[key], arg)

    defaults.update(known)
    return dict(known)


# The kinds of values that settings hold, each checked in one place: check_values(settings, {name: kind}).
VALUE_KINDS = {
    "count": (lambda v: v >= 1, "at least 1"),
    "count0": (lambda v: v >= 0, "0 or more"),
    "seed": (lambda v: 0 <= v < 2 ** 64, "a seed from 0 to 2**64 - 1 (64 bits)"),
    "rate": (lambda v: math.isfinite(v) and v > 0, "a finite number above 0"),
    "rate0": (lambda v: math.isfinite(v) and v >= 0, "a finite number, 0 or more"),
    "fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),  # NaN fails every comparison
}


def check_values(settings, kinds):
    """Check settings whose type is right but whose value makes no sense (a negative seed, beta1 = 1, a NaN
    learning rate, ...). `kinds` maps a setting's name to one of VALUE_KINDS. Raises UserError naming the
    setting, its value and what it must be."""
    for name, kind in kinds.items():
        ok, expected = VALUE_KINDS[kind]
        if not ok(settings[name]):
            raise UserError(f"{name} must be {expected}, got {settings[name]!r}")


def check_utf8(name, value):
    """Raise UserError unless `value` (a setting's value, or the text given for it; the strs inside lists, tuples
    and dicts too) can be written as UTF-8. Python decodes bytes of the command line that are not UTF-8
    (`--out_dir=$'\\xff'`) to lone surrogates (U+DC80..U+DCFF), which every later print, path or JSON would fail
    on; `name` ("--out_dir", "cfg.py: out_dir") says where the value came from. The message names the first
    offending byte (or character, for a surrogate written into a config file) and its position."""
    if isinstance(value, (list, tuple)):
        for item in value:
            check_utf8(name, item)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_utf8(name, k)
            check_utf8(name, v)
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            code = ord(value[e.start])
            what = f"byte {code - 0xDC00:#x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
            raise UserError(f"{name}: the value is not valid UTF-8 text ({what} at position {e.start}): pass UTF-8 "
                            f"text (set the terminal, or save the file, as UTF-8)") from None


def read_text(path, what="file", limit=64 << 20, hint=""):
    """The content of the UTF-8 text file `path` that the user named, as str (universal newlines), read as editors
    write it: a leading byte-order mark (EF BB BF, which Windows editors put first) is not text and is dropped.
    `what` names the file in messages ("the prompt file", "the text file"); `limit` is the largest size in bytes
    that makes sense for this kind of file (64 MiB unless the caller says), `hint` how to make a larger one fit.

    The file is checked before it is opened (files.check_input_file): a device such as /dev/zero, a FIFO, a folder
    or a file over `limit` bytes is refused, never read until the memory runs out or blocked on.
    Raises UserError: missing, not a regular file, too large, unreadable, or not UTF-8 (with the offending byte
    and its offset)."""
    data = read_input_bytes(path, what, limit, hint)
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} ({what}) is not UTF-8 text (byte {e.object[e.start]:#x} at offset "
                        f"{bom + e.start}): save it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as open() in text mode


# --------------------------------------------------------------------------------------------------------------
# Device and precision

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device="auto", dtype="auto", cuda=None, mps=None, cuda_bf16=None, quantize=""):
    """Choose the device and the autocast precision.

    Args:
        device: "auto" (cuda, then mps, then cpu), "cpu", "mps", "cuda" or "cuda:N".
        dtype: "auto", "float32", "bfloat16" or "float16". "auto" is bfloat16 on CUDA GPUs that support it
            and on CPU, float16 on other CUDA GPUs and on MPS.
        quantize: "" or "int8" (quantize_int8), which runs on the CPU in float32: auto then means those.
        cuda, mps, cuda_bf16: what this machine has; detected when None (tests pass them in).
    Returns:
        (device, device_type, dtype): e.g. ("cuda:0", "cuda", "bfloat16").
    Raises:
        UserError: the device or dtype is unknown or not available here (the message lists what is), or
            quantize is not "" or "int8", or int8 is asked for off the CPU or with a 16-bit dtype.
    """
    if quantize not in ("", "int8"):
        raise UserError(f"quantize={quantize!r}: the only quantization is int8 (or leave it empty)")
    if quantize:
        if device not in ("auto", "cpu") or dtype not in ("auto", "float32"):
            raise UserError("--quantize=int8 runs on the CPU with float32 activations: drop --device/--dtype or "
                            "use --device=cpu --dtype=float32")
        device, dtype = "cpu", "float32"
    cuda_probe = cuda is None
    cuda = torch.cuda.is_available() if cuda is None else cuda
    mps = (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()) if mps is None else mps
    available = [d for d, ok in (("cuda", cuda), ("mps", mps), ("cpu", True)) if ok]
    if device == "auto":
        device = available[0]
    try:
        device_type = torch.device(device).type
    except RuntimeError:
        device_type = None
    if device_type not in ("cuda", "mps", "cpu"):
        raise UserError(f"unknown device {device!r}: use auto, cpu, mps, cuda or cuda:N")
    if device_type not in available:
        why = " (MPS needs a Mac with Apple silicon)" if device_type == "mps" else ""
        raise UserError(f"device {device!r} is not available on this machine{why}; "
                        f"available: {', '.join(available)}")
    if device_type == "cuda":
        index, count = torch.device(device).index, torch.cuda.device_count() if cuda_probe else None
        if count is not None and index is not None and index >= count:
            raise UserError(f"device {device!r} does not exist: this machine has {count} GPU(s), cuda:0 to "
                            f"cuda:{count - 1}")
        cuda_bf16 = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cpu" or (device_type == "cuda" and cuda_bf16) else "float16"
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    if dtype == "bfloat16" and device_type == "cuda" and not cuda_bf16:
        raise UserError("this GPU does not support bfloat16: use --dtype=float16 (with loss scaling) or float32")
    return device, device_type, dtype



def available_memory(device):
    """Bytes of memory free for new tensors on `device`: free GPU memory on CUDA, else the machine's available
    RAM (MPS shares it); None where the OS does not say."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:  # Linux: free memory plus what the kernel can reclaim (file cache), its own estimate for new programs
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") if "SC_AVPHYS_PAGES" in os.sysconf_names else os.sysconf("SC_PHYS_PAGES")
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def autocast(device_type, dtype):
    """Context manager running matmuls in `dtype` (mixed precision, Micikevicius et al. 2018); float32: no-op."""
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype], enabled=dtype != "float32")

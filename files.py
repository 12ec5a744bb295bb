"""Files written safely: whole or not at all (atomic_file), appended without following links (append_line), and
folders locked to one writer (lock_dir). Every file this project writes goes through here.

Also the one check of a file the user names before it is read (check_input_file: a regular file of sane size,
never a device, FIFO or folder), and the one reader of files saved with torch.save (load_torch), which refuses
code inside them."""

import contextlib
import errno
import os
import stat
import sys
import tempfile

import torch

from errors import UserError


class _WriteRecorder:
    """The file object torch.save writes to: it keeps the OSError of a failed write (disk full, file too
    large), which torch itself turns into an unhelpful RuntimeError about file positions."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """Write `path` whole or not at all: yield a new temporary file beside it, opened in `mode` ("w": UTF-8 text,
    "wb": bytes); when the block ends without an error, flush and fsync it, rename it over `path` and fsync the
    directory, so `path` is always either the old file or the complete new one. Creates missing folders.

    The temporary file gets a unique name (`.NAME.XXXXXXXX.tmp`) and is created exclusively (tempfile.mkstemp:
    O_CREAT | O_EXCL, which never follows a symbolic link), and the rename replaces a link at `path` rather than
    writing through it; the file gets the permissions the umask gives new files. On any error (OSError from a full
    disk, Ctrl-C, ...) the temporary file is removed and the error re-raised."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def fsync_dir(folder):
    """fsync a directory, so the renames in it survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_torch(obj, path):
    """Write `obj` with torch.save through atomic_file: `path` is always the old file or the complete new one.
    Raises OSError when the write fails (e.g. disk full), after removing the temporary file."""
    with atomic_file(path, "wb") as f:
        writer = _WriteRecorder(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def write_text_atomic(text, path):
    """Write the str `text` to `path` (UTF-8) through atomic_file. Raises OSError (the temporary file removed)."""
    with atomic_file(path) as f:
        f.write(text)


MiB = 1 << 20
GiB = 1 << 30

_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def check_input_file(path, what, limit=None, hint=""):
    """Check a file the user named before anything opens it: it must be a regular file (a link to one is fine)
    of at most `limit` bytes. Reading /dev/zero or /dev/urandom would fill the memory, opening a FIFO blocks
    until a writer comes and reading a folder fails with an odd message; os.stat tells them apart without opening
    anything. Every script routes the files it is given (prompts, texts, instructions, reports, tokenizers,
    datasets, meta.json) through here, each kind with its own limit.

    Args:
        path: the file. what: what it is to the user, for messages ("the prompt file", "the train split").
        limit: the largest size in bytes that makes sense for this kind of file; None: any (files read in
            pieces, such as a dataset). hint: appended to the too-large message (how to make it smaller).
    Returns:
        its size in bytes (int).
    Raises:
        UserError: one line naming the file and what is wrong: it does not exist, cannot be reached
            (permissions), is a directory, character device, block device, FIFO or socket, or is too large
            ("too large: N bytes, the limit is M").
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path} ({what}) does not exist: name a file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise UserError(f"cannot read {path} ({what}): {getattr(e, 'strerror', None) or e}") from None
    for test, kind in _NOT_REGULAR:
        if test(st.st_mode):
            raise UserError(f"{path} ({what}) is {kind}, not a regular file: name a file")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path} ({what}) is not a regular file: name a file")
    if limit is not None and st.st_size > limit:
        raise UserError(f"{path} ({what}) is too large: {st.st_size:,} bytes, the limit is {limit:,}"
                        f"{f'; {hint}' if hint else ''}")
    return st.st_size


def read_input_bytes(path, what, limit, hint=""):
    """The bytes of a file the user named, checked by check_input_file first and read with O_NONBLOCK (a FIFO put
    there after the check does not block the open) and never more than `limit` bytes (a file that grows while it
    is read, or one whose size the OS reports as 0, such as those in /proc). Returns bytes.
    Raises UserError: see check_input_file; also a file that changed into something else, grew past `limit`,
    or cannot be read (permissions)."""
    check_input_file(path, what, limit, hint)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise UserError(f"cannot read {path} ({what}): {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{path} ({what}) changed while it was opened and is no longer a regular file")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise UserError(f"cannot read {path} ({what}): {e.strerror or e}") from None
    if len(data) > limit:
        raise UserError(f"{path} ({what}) is too large: more than the limit of {limit:,} bytes"
                        f"{f'; {hint}' if hint else ''}")
    return data


def load_torch(path, device="cpu"):
    """Read a file written by torch.save with `weights_only=True`: tensors and plain data load, code does not run.

    Returns what was saved (a checkpoint's dict), tensors on `device`.
    Raises UserError: the file is missing, truncated or corrupt, or holds objects other than tensors and plain
    data (never load such a file from elsewhere: it could run any code).
    """
    if not os.path.isfile(path):
        raise UserError(f"{path} is not a file")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        first = (str(e).splitlines() or [""])[0]
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"{path} is not a readable checkpoint: it holds objects other than tensors and plain "
                            f"data, which could run code, so it is refused (load only checkpoints written by "
                            f"this project's train.py)") from None
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                        f"{type(e).__name__}: {first}") from None


def append_line(path, line):
    """Append the str `line` (UTF-8) to `path`, creating it if needed. Opened with O_NOFOLLOW: a symbolic link
    planted at `path` is refused (OSError) instead of written through."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "a", encoding="utf-8", newline="") as f:
        f.write(line)


_held_locks = {}  # real path of a locked folder -> its open lock file: a lock lasts as long as the file is open


def lock_dir(folder, owner, shared=False):
    """Lock `folder` for this process's lifetime with an OS file lock on folder/.lock (flock): one writer at a time,
    or (shared=True) any number of readers while no writer holds it. The kernel releases the lock when the process
    ends, however it ends, so a killed run never leaves a stale lock. An exclusive holder writes its pid and
    command line into the file so that the next one can name it.

    train.py locks its out_dir exclusively and its data_dir shared; prepare.py locks its data_dir exclusively, so
    data cannot be rewritten under a running train.py. An exclusive holder also removes the temporary files
    (atomic_file's .NAME.XXXXXXXX.tmp) that a killed process left. Where the OS has no flock (Windows), nothing
    is locked.

    Args:
        folder: the directory (created if missing, for an exclusive lock). owner: the script's name, for messages.
    Raises:
        UserError: the folder cannot be written (read-only, permissions), or another process holds the lock
            (naming it when it can).
    """
    try:
        import fcntl
    except ImportError:
        return
    if os.path.realpath(folder) in _held_locks:
        return  # this process holds it already (e.g. out_dir and data_dir are one folder)
    lock_path = os.path.join(folder, ".lock")
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    if shared and not os.path.isdir(folder):
        return  # nothing to read there: the caller's own check says so
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(lock_path, flags, 0o666)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UserError(f"cannot lock {folder}: {lock_path}: {e.strerror or e}") from None
        if not shared:
            why = "a read-only file system" if e.errno == errno.EROFS else "read-only or not yours"
            raise UserError(f"cannot write in {folder} ({why}): choose a folder you can write to, or fix its "
                            f"permissions") from None
        try:  # a shared lock needs only read access to a lock file that is there already
            fd = os.open(lock_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            # A read-only data directory (a mounted dataset, a shared cache): no lock file can be made there, and
            # none is needed: whoever cannot create a file there cannot rewrite the data either (prepare.py's
            # exclusive lock and its writes fail the same way).
            return
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        try:  # whoever holds it exclusively left its pid; if a shared lock can be had, only readers hold it
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            writer = None
        except BlockingIOError:
            writer = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "pid unknown"
        os.close(fd)
        if writer is None:
            raise UserError(f"{folder} is in use by a running train.py, which reads the data there: wait for it "
                            f"to end or stop it, or use another folder") from None
        raise UserError(f"{folder} is in use by another process ({writer}): wait for it to end or stop it, or "
                        f"use another folder; only one {owner} may work on a folder at a time") from None
    if not shared:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)}".encode()[:4000], 0)
        for name in os.listdir(folder):  # no one else writes here now: these were left by a killed process
            if name.startswith(".") and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))
    _held_locks[os.path.realpath(folder)] = fd

"""Run the project's scripts in processes forked from a Python that has already imported torch.

Most of the suite's time goes into starting scripts as a user does (`python train.py ...`), and every start first
imports torch, and every training run torch._dynamo too (torch imports it on a model's first step): 2 to 4 s of a
CPU before the script's own work, in more than a hundred runs a session. Here one process per pytest process (per
xdist worker) imports them once, then forks a child for each run. The child is the run: it takes the run's
command-line arguments, working directory and environment, writes to its own stdout and stderr (stdin is
/dev/null), executes the script as `__main__` (runpy), and ends as `python script args` ends, through the
interpreter's normal shutdown (atexit handlers, flushing): status 0, a SystemExit's code, 1 after printing an
uncaught exception's traceback, or death by a signal. The script imports everything else itself, as in a fresh
interpreter.

What a child shares with its parent, unlike a fresh interpreter: the modules of PRELOAD, imported under the
parent's environment, and the parent's hash seed (the order of sets of strings). So a run whose environment
differs from the parent's in a variable that Python's start or PRELOAD's imports might read (any variable but
those of LATE, which only the scripts and the libraries they import themselves read) runs in a fresh interpreter
instead, as does a run asked for with fresh=True (tests that compare separate runs bit for bit use it for one of
them), and every run when TESTS_FRESH_PYTHON=1 or on another system than Linux (5.3 or later).
"""
import gc
import io
import locale
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile

PRELOAD = ["torch", "torch._dynamo"]
# environment variables (names and prefixes) that neither Python's start nor PRELOAD's imports read: a run may set
# them otherwise than the parent's environment and still be forked from it
LATE = ("HF_", "WANDB_", "TRANSFORMERS_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "HTTP_PROXY", "http_proxy",
        "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy",
        "PYTEST_CURRENT_TEST",  # pytest's, during each test
        "TORCHINDUCTOR_CACHE_DIR")  # read when compiling; importing torch._dynamo sets it in the pytest process


def has_pidfd():
    """Whether this system has pidfd_open (Linux 5.3 and later), which the parent waits on its children with.
    Elsewhere every run gets a fresh interpreter (on macOS, forking after importing torch is not safe anyway)."""
    try:
        os.close(os.pidfd_open(os.getpid()))
        return True
    except (AttributeError, OSError):
        return False


HAS_PIDFD = has_pidfd()


def send(fd, obj):
    data = pickle.dumps(obj)
    os.write(fd, struct.pack("<I", len(data)) + data)


def receive(fd):
    """The next object sent on fd, or None at its end."""
    header = read_exactly(fd, 4)
    return pickle.loads(read_exactly(fd, struct.unpack("<I", header)[0])) if header else None


def read_exactly(fd, n):
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


# --- the parent, `python warm_python.py`: a request on stdin, its reply on stdout, one run at a time ---------------

def serve():
    requests, replies = os.dup(0), os.dup(1)  # the protocol; fds 0 to 2 are for the children's streams
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    for name in PRELOAD:
        __import__(name)
    # what the imports made lives as long as any child: out of the garbage collector's sight (gc.freeze, as its
    # documentation advises before forking), no child's collections walk through it, nor copy its pages in doing
    # so; that halves what a short run costs
    gc.freeze()
    while (request := receive(requests)) is not None:
        pid = os.fork()
        if pid == 0:
            os.close(requests)
            os.close(replies)
            become(**request["run"])  # does not return
        send(replies, {"returncode": wait(pid, request["timeout"])})


def wait(pid, timeout):
    """The exit status of child pid as subprocess reports it (-N: ended by signal N), or None if it ran longer
    than timeout seconds (then it is killed)."""
    pidfd = os.pidfd_open(pid)
    ready, _, _ = select.select([pidfd], [], [], timeout)
    os.close(pidfd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if ready else None


def become(script, args, cwd, env, stdout, stderr):
    """In the forked child: be `python script args` in cwd with env, writing to the files stdout and stderr. How
    the script ends (SystemExit, an exception) goes up to the top level, where the interpreter handles it as it
    does for any script."""
    import runpy
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, stdout, os.O_WRONLY), (2, stderr, os.O_WRONLY)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(script)  # as for `python script`: the script's folder first
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)


# --- the client, in the pytest process ----------------------------------------------------------------------------

class WarmPython:
    """The parent process, started on first use with the environment `base_env`, and runs through it."""

    def __init__(self, base_env):
        self.base_env, self.proc = dict(base_env), None

    def can_run(self, env):
        """Whether a run with the environment `env` may be forked from the parent (see the module's docstring)."""
        if os.environ.get("TESTS_FRESH_PYTHON", "") not in ("", "0") or not HAS_PIDFD:
            return False
        changed = {k for k in env.keys() | self.base_env.keys() if env.get(k) != self.base_env.get(k)}
        return all(k.startswith(LATE) for k in changed)

    def run(self, script, args, cwd, env, timeout):
        """As subprocess.run([sys.executable, script, *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout), in a child of the parent process. Returns the CompletedProcess."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, __file__], env=self.base_env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE)
        cmd = [sys.executable, str(script), *map(str, args)]
        outputs = []
        try:
            for _ in range(2):  # files of this run only: a process the run started may outlive it
                fd, path = tempfile.mkstemp(prefix="run-", suffix=".txt")
                os.close(fd)
                outputs.append(path)
            run = dict(script=cmd[1], args=cmd[2:], cwd=str(cwd), env=env, stdout=outputs[0], stderr=outputs[1])
            send(self.proc.stdin.fileno(), {"run": run, "timeout": timeout})
            reply = receive(self.proc.stdout.fileno())
            if reply is None:
                raise RuntimeError(f"the warm Python process ended (exit {self.proc.wait()}) during {cmd[1:]}")
            stdout, stderr = map(self.decode, outputs)
        except BaseException:  # e.g. Ctrl-C while a run goes on: the next run starts another parent
            self.close()
            raise
        finally:
            for path in outputs:
                os.unlink(path)
        if reply["returncode"] is None:
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
        return subprocess.CompletedProcess(cmd, reply["returncode"], stdout, stderr)

    @staticmethod
    def decode(path):
        """A file's bytes as text, as subprocess.run(text=True) decodes a pipe: in the locale's encoding, with each
        \\r\\n or \\r read as \\n."""
        with open(path, "rb") as f:
            return io.TextIOWrapper(io.BytesIO(f.read()), encoding=locale.getpreferredencoding(False)).read()

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


if __name__ == "__main__":
    serve()

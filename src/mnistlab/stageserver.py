"""The stage server: stage processes forked from one that has already imported torch, MLflow,
scikit-learn, SciPy, matplotlib and pandas, instead of each importing them afresh.

::

    python -m mnistlab.stageserver -- dvc exp run ...    # COMMAND, its stages served
    python -m mnistlab.stageserver run SCRIPT [ARGS...]  # stages/run.sh's `python SCRIPT ARGS`

Why: every stage is its own process (DVC runs a command per stage), and 5-8 s of each one is
imports before its work begins: on an Intel Xeon with AMX (2 cores) the full-MNIST mlp stages
took 17.0 / 7.9 / 16.6 / 14.5 s (train, evaluate, features, compare) as fresh interpreters and
10.2 / 3.1 / 9.9 / 6.2 s forked from a process with those imports done (README, Performance).
A pipeline runs ~20 stage processes per dataset, the test suite a few hundred; no change inside
a stage removes that cost, because it is paid before the stage's code runs.

How: ``make run`` (:mod:`mnistlab.repro`), the CI gate's copies and the test suite start a
:class:`Server` for the length of their ``dvc repro`` and name its socket in
``MNISTLAB_STAGE_SERVER``. For ``python SCRIPT ARGS``, stages/run.sh then runs this module's
client, ``python -m mnistlab.stageserver run SCRIPT ARGS`` (standard library only, ~0.05 s),
which hands the server its arguments, working directory, environment, umask, CPU affinity and
its stdin, stdout and stderr (the descriptors themselves). The server forks a child that
becomes the stage: those descriptors, that directory and environment, ``sys.argv``,
``sys.path[0]`` the script's folder, and mnistlab imported afresh from the client's path (its
code may have changed since the server started; a CI copy has its own ``src/``). The client
waits and leaves with the child's exit status, or dies of the signal that killed it.

The client is the stage process as DVC and the user see it: a stop signal sent to it goes on to
the child; if it dies (kill -9), the server kills the child; if the server dies, its children
die with it (``PR_SET_PDEATHSIG``) and their clients fail with one line. The server itself ends
with the process that started it.

The client runs the script as plain ``python SCRIPT ARGS`` (exec: nothing else changes) whenever
the server cannot stand in for a fresh interpreter: no server or none answering, another
interpreter or flags, an environment variable that is not one a stage reads only while it runs
(:func:`mismatch`: ``OMP_NUM_THREADS``, ``PYTHONPATH``, ``HOME`` are read when libraries are
imported or the interpreter starts), other resource limits, a lower niceness or another cgroup.
``MNISTLAB_STAGE_SERVER=off`` turns serving off; with ``MNISTLAB_DEBUG=1`` the client says on
stderr why it did not use the server. Linux only (fork, descriptor passing, the death signal).

This module imports only the standard library at its top: the client must start fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ENV = "MNISTLAB_STAGE_SERVER"
OFF = ("off", "0", "false", "no")

# Environment variables that the stages and DVC read while a stage runs, and no preloaded library
# when it is imported (MLflow reads its variables on use; mnistlab is imported afresh by every
# stage): these may differ between the server and a stage. Any other difference, e.g.
# OMP_NUM_THREADS (read by OpenMP when torch is loaded), PYTHONPATH, PYTHONHASHSEED, HOME or
# MPLCONFIGDIR (matplotlib's config, read at import), makes the client run a fresh interpreter.
# CUDA's are read when CUDA initializes, which the server never does (it could not fork after):
# each stage initializes it itself. (mnistlab.utils sets CUBLAS_WORKSPACE_CONFIG for deterministic
# runs in the process that asks for them, a test process too.)
RUNTIME_PREFIXES = ("DVC_", "MLFLOW_", "_MLFLOW_", "MNISTLAB_", "PYTEST_", "GIT_")
RUNTIME_NAMES = frozenset({"PATH", "PWD", "OLDPWD", "SHLVL", "_", "TERM", "COLUMNS", "LINES",
                           "CUDA_VISIBLE_DEVICES", "CUBLAS_WORKSPACE_CONFIG"})

# What the server imports before it serves: the stage modules, with everything they import at
# their top, and what the stages import inside functions.
PRELOAD = (
    "mnistlab.stages.train", "mnistlab.stages.evaluate", "mnistlab.stages.features",
    "mnistlab.stages.compare", "mnistlab.data.download", "mnistlab.data.split",
    "torch._dynamo",  # imported by every torch optimizer's constructor (~1.5 s)
    "mlflow", "mlflow.pytorch", "mlflow.tracking",
    "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
    "sklearn.manifold", "sklearn.metrics", "scipy.stats", "matplotlib.pyplot", "pandas",
)

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Passed on to the child by the client: what a user or DVC sends to stop or signal a stage.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
HEADER = struct.Struct("!I")
_ROOT_LOGGER: tuple[list, int] | None = None  # the server's root logger before its imports


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(socket, "send_fds")


def debug(message: str) -> None:
    if os.environ.get("MNISTLAB_DEBUG", "") not in ("", "0"):
        print(f"stage server: {message}", file=sys.stderr, flush=True)


def runtime_only(name: str) -> bool:
    return name in RUNTIME_NAMES or name.startswith(RUNTIME_PREFIXES)


def mismatch(server: Mapping[str, str], client: Mapping[str, str],
             set_by_imports: Mapping[str, str] | None = None) -> str | None:
    """The first environment variable that differs between ``server`` and ``client`` and is read
    by an interpreter or library at start-up (not :func:`runtime_only`); None if there is none.
    ``set_by_imports``: what the server's imports set, which the client may also have (its parent
    imported the same library: a test process) and a fresh stage would set again."""
    also = set_by_imports or {}
    for name in sorted(set(server) | set(client)):
        if runtime_only(name) or server.get(name) == client.get(name):
            continue
        if name in also and client.get(name) == also[name]:
            continue
        return name
    return None


def _death_signal(sig: int) -> None:
    """Have the kernel send this process ``sig`` when the process (thread) that forked it ends."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _cgroup() -> str:
    try:
        return Path("/proc/self/cgroup").read_text()
    except OSError:
        return ""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def describe_process() -> dict[str, Any]:
    """What a stage process inherits besides its arguments and descriptors, for :func:`refusal`
    (the server compares its own) and for the child to take on."""
    import resource

    limits = {name: list(resource.getrlimit(getattr(resource, name)))
              for name in sorted(dir(resource)) if name.startswith("RLIMIT_")}
    # The interpreter file (python and python3 in a venv are links to one) and its environment.
    return {"executable": os.path.realpath(sys.executable), "prefix": sys.prefix, "flags": list(sys.flags),
            "version": sys.version, "env": dict(os.environ), "cwd": os.getcwd(), "umask": _umask(),
            "nice": os.getpriority(os.PRIO_PROCESS, 0), "affinity": sorted(os.sched_getaffinity(0)),
            "limits": limits, "cgroup": _cgroup()}


def refusal(server: Mapping[str, Any], client: Mapping[str, Any]) -> str | None:
    """Why a process forked from ``server`` would not be what ``client`` would have started
    (both :func:`describe_process`), or None when it would be."""
    for key in ("executable", "prefix", "version", "flags", "limits", "cgroup"):
        if server[key] != client[key]:
            return f"another {key} than the server's"
    if client["nice"] < server["nice"]:
        return f"niceness {client['nice']}, below the server's {server['nice']}"
    name = mismatch(server["env"], client["env"], server.get("imports_set"))
    if name is not None:
        return f"environment variable {name} differs from the server's"
    return None


# --------------------------------------------------------------------------- messages

def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _receive_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """A client's request and the three descriptors sent with it (closed here if not three)."""
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < HEADER.size or len(data) < HEADER.size + HEADER.unpack_from(data)[0]:
        more = conn.recv(1 << 16)
        if not more:
            break
        data += more
    if len(fds) != 3 or len(data) < HEADER.size:
        for fd in fds:
            os.close(fd)
        raise ValueError("a request without its three descriptors")
    return json.loads(data[HEADER.size:HEADER.size + HEADER.unpack_from(data)[0]]), fds


# --------------------------------------------------------------------------- the server

def preload() -> list[str]:
    """Import :data:`PRELOAD`; then forget mnistlab's own modules (each stage imports them afresh,
    from its own path), keeping every library they imported. Returns what failed to import."""
    import importlib

    failed = []
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a stage that needs it will say what is wrong
            failed.append(f"{name}: {type(e).__name__}: {e}")
    forget_mnistlab()
    return failed


def forget_mnistlab() -> None:
    for name in [n for n in sys.modules if n == "mnistlab" or n.startswith("mnistlab.")]:
        del sys.modules[name]


def serve(path: str) -> None:
    """Listen on ``path``, preload, then fork a stage for every accepted request, until SIGTERM
    or the end of the process that started this one."""
    import gc
    import logging
    import selectors

    _death_signal(signal.SIGTERM)
    # Python's advice for a process that forks without exec (the gc module's docs): no collection
    # while importing (no freed holes in the pages the children share), then every object so far
    # frozen, so that a child's collections never walk (and write to) the imported modules' objects.
    gc.disable()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)  # clients may queue while the imports below run
    me = describe_process()  # before the imports, which may set variables (compared with a client's)
    global _ROOT_LOGGER
    _ROOT_LOGGER = (list(logging.root.handlers), logging.root.level)
    for line in preload():
        print(f"preload {line}", file=sys.stderr, flush=True)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a fork would inherit a broken CUDA
        print("an import initialized CUDA: not serving (every stage a fresh interpreter)",
              file=sys.stderr, flush=True)
        return
    # What the imports set, which a fresh interpreter's imports would set too: given to each stage.
    me["imports_set"] = {k: v for k, v in os.environ.items() if me["env"].get(k) != v}
    gc.freeze()
    stopping: list[int] = []
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the select below, through wake_w
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGHUP, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # stopped by its owner, not the terminal's ^C
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    while not stopping:
        for key, _ in sel.select(timeout=1.0):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                pid = _start_stage(conn, me, keep={listener.fileno(), wake_r, wake_w, sel.fileno(),
                                                   *(c.fileno() for c in children.values())})
                if pid:
                    children[pid] = conn
                    sel.register(conn, selectors.EVENT_READ, pid)
                else:
                    conn.close()
            elif key.fileobj == wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
            elif not _readable(key.fileobj):  # the client is gone (killed): so goes its stage
                with contextlib.suppress(ProcessLookupError):
                    os.kill(key.data, signal.SIGKILL)
                sel.unregister(key.fileobj)
        _reap(children, sel)
    # Children still running die with this process (their death signal); their clients say so.


def _readable(conn: socket.socket) -> bool:
    """False once the client has closed its end (or reset it)."""
    try:
        return bool(conn.recv(64))
    except OSError:
        return False


def _reap(children: dict[int, socket.socket], sel) -> None:
    """Tell each ended child's client how it ended."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(conn)
        with contextlib.suppress(OSError):
            _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
        conn.close()


def _start_stage(conn: socket.socket, me: dict[str, Any], keep: set[int]) -> int | None:
    """Read ``conn``'s request and fork its stage (returns the child's pid), or refuse it."""
    import warnings

    conn.settimeout(30)  # a client that connects and says nothing cannot hold the server
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, gid = struct.unpack("3i", creds)
        request, fds = _receive_request(conn)
    except (OSError, ValueError) as e:
        print(f"a bad request: {e}", file=sys.stderr, flush=True)
        return None
    why = refusal(me, request) if (uid, gid) == (os.getuid(), os.getgid()) else "another user"
    if why is not None:
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):
            _send(conn, {"refused": why})
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    server = os.getpid()
    with warnings.catch_warnings():  # 3.12+: "multi-threaded, use of fork() may lead to
        warnings.simplefilter("ignore", DeprecationWarning)  # deadlocks": OpenBLAS's idle pool,
        pid = os.fork()  # which it rebuilds in the child (its own fork handler)
    if pid == 0:
        _become_stage(request, fds, conn, keep, server, me["imports_set"])  # never returns
    for fd in fds:
        os.close(fd)
    try:
        conn.settimeout(None)
        _send(conn, {"pid": pid})
    except OSError:  # the client is gone already
        os.kill(pid, signal.SIGKILL)
    return pid


def _become_stage(request: dict[str, Any], fds: list[int], conn: socket.socket, keep: set[int],
                  server: int, imports_set: Mapping[str, str]) -> None:
    """In the forked child of ``server``: take on the client's process state, then run its
    script as ``python SCRIPT ARGS`` would, and exit with its status. Never returns."""
    import gc

    try:
        _death_signal(signal.SIGKILL)
        if os.getppid() != server:  # the server died before the line above
            os._exit(1)
        conn.close()
        signal.set_wakeup_fd(-1)
        for fd in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt, as at start
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in set(fds) - {0, 1, 2}:
            os.close(fd)
        if not os.environ.get("PYTHONUNBUFFERED"):  # as the interpreter sets it at start
            sys.stdout.reconfigure(line_buffering=os.isatty(1))
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.setpriority(os.PRIO_PROCESS, 0, request["nice"])
        os.sched_setaffinity(0, request["affinity"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.update(imports_set)
        _fresh_state(request["argv"], request["python"])
        gc.enable()  # collections as in any process, over what this one creates (serve's comment)
    except BaseException as e:  # noqa: BLE001 - never back into the server's loop
        with contextlib.suppress(BaseException):
            print(f"error: stage server: could not start {request['argv'][0]}: {e}", file=sys.stderr)
        os._exit(1)
    code: object = 0
    try:
        _run_main(request["argv"][0])
    except SystemExit as e:
        code = e.code
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught error
        sys.excepthook(*sys.exc_info())
        code = 1
    _finish(code)


def _run_main(script: str) -> None:
    """Run ``script`` as ``__main__``, as ``python script`` does: ``__file__`` its absolute path
    (3.9+), ``sys.argv[0]`` left as given (``runpy.run_path`` would set it to the path it got)."""
    import builtins
    import importlib.machinery
    import types

    path = os.path.abspath(script)
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=path, __cached__=None, __builtins__=builtins,
                         __loader__=importlib.machinery.SourceFileLoader("__main__", path))
    sys.modules["__main__"] = main
    with open(path, "rb") as f:  # bytes: compile() honours a coding cookie, as python does
        code = compile(f.read(), path, "exec", dont_inherit=True)
    exec(code, main.__dict__)


def _fresh_state(argv: Sequence[str], python: str) -> None:
    """What a fresh interpreter for ``python SCRIPT ARGS`` has that this fork does not."""
    import importlib

    sys.argv = list(argv)
    sys.executable = python  # as the client was started (the server's may be another link to it)
    sys.path[0] = os.path.dirname(os.path.realpath(argv[0]))  # the script's folder, as python sets it
    forget_mnistlab()  # imported from the client's path, as its code is now
    if _ROOT_LOGGER is not None:
        # The root logger as before the imports. Why: mlflow.pytorch's import calls
        # logging.basicConfig(level=ERROR); a fresh stage imports it lazily, after its own
        # basicConfig(INFO) (mnistlab.errors.run_stage), which this one would then skip.
        import logging

        logging.root.handlers[:] = _ROOT_LOGGER[0]
        logging.root.setLevel(_ROOT_LOGGER[1])
    importlib.invalidate_caches()  # files created since the server looked
    if "numpy" in sys.modules:  # random's own state is reseeded at fork; numpy's legacy one is not
        sys.modules["numpy"].random.seed()


def _finish(code: object) -> None:
    """Leave as :func:`mnistlab.errors.exit_process` does, once every non-daemon thread has ended
    (what the interpreter waits for at exit)."""
    import threading

    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    try:
        from mnistlab.errors import exit_process
    except BaseException:  # noqa: BLE001 - mnistlab itself is broken: its stage said how
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
    exit_process(code)


# --------------------------------------------------------------------------- the client

def client(argv: Sequence[str]) -> None:
    """Run ``python SCRIPT ARGS`` (``argv``) through the server named by ``MNISTLAB_STAGE_SERVER``
    if it will, else exec that command. Never returns."""
    path = os.environ.get(ENV, "")
    # Only `python SCRIPT ARGS`: options (-c, -m, -u, ...) and a missing script are python's own
    if (path and path.lower() not in OFF and supported() and argv and not argv[0].startswith("-")
            and os.path.isfile(argv[0])):
        code = _served(path, argv)
        if code is not None:
            _leave(code)
    os.execv(sys.executable, [sys.executable, *argv])


def _served(path: str, argv: Sequence[str]) -> int | None:
    """The served stage's exit status (minus a signal's number if one killed it), or None when
    the server did not run it."""
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
        request = json.dumps({**describe_process(), "argv": list(argv),
                              "python": sys.executable}).encode()
        message = HEADER.pack(len(request)) + request
        sent = socket.send_fds(conn, [message], [0, 1, 2])
        if sent < len(message):  # not sendall(b""): after a quick refusal that fails (EPIPE)
            conn.sendall(message[sent:])
        replies = conn.makefile("rb")
        first = json.loads(replies.readline() or b"{}")
    except (OSError, ValueError) as e:
        debug(f"{path}: {e}; running a fresh interpreter")
        return None
    if "pid" not in first:
        debug(f"not served ({first.get('refused', 'the server closed the connection')}); "
              "running a fresh interpreter")
        return None
    pid = first["pid"]
    debug(f"{argv[0]} runs as process {pid}, forked by {path}")

    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    last = json.loads(replies.readline() or b"{}")
    if "exit" not in last:
        print(f"error: the stage server stopped while it ran {argv[0]} (process {pid})",
              file=sys.stderr)
        return 1
    return int(last["exit"])


def _leave(code: int) -> None:
    """Exit as the served stage did: with its status, or killed by the same signal."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code < 0:
        with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler to reset
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code & 0xFF)


# --------------------------------------------------------------------------- owners

class Server:
    """A stage server process, started with ``env`` (default: this process's environment).

    :meth:`start` returns the environment for the commands whose stages it serves: ``env`` with
    ``MNISTLAB_STAGE_SERVER`` set, or ``env`` unchanged where serving is off (``off`` in that
    variable) or unsupported. :meth:`stop` ends it (also at the end of this process).
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = dict(os.environ if env is None else env)
        self.proc = None
        self.folder: Path | None = None

    def start(self, wait: float = 10.0) -> dict[str, str]:
        import subprocess
        import tempfile
        import time

        if self.env.get(ENV, "").lower() in OFF or not supported():
            return dict(self.env)
        if any(p and not os.path.isabs(p) for p in self.env.get("PYTHONPATH", "").split(os.pathsep)):
            return dict(self.env)  # relative to each stage's directory: the server has none
        self.folder = Path(tempfile.mkdtemp(prefix="mnistlab-stages-"))  # mode 0700: this user's
        sock = self.folder / "socket"
        with open(self.folder / "server.log", "wb") as log:
            self.proc = subprocess.Popen(
                # absolute: python started as `.venv/bin/python` (a relative PATH entry) has a
                # relative sys.executable, which would not resolve from the server's folder
                [os.path.abspath(sys.executable), "-m", "mnistlab.stageserver", "serve", str(sock)],
                env={k: v for k, v in self.env.items() if k != ENV}, cwd=self.folder,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True)  # the terminal's ^C reaches the stages through their clients
        deadline = time.monotonic() + wait
        while not sock.exists() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if not sock.exists():
            self.stop()
            return dict(self.env)
        return {**self.env, ENV: str(sock)}

    def stop(self) -> None:
        import shutil
        import subprocess

        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.folder is not None:
            with contextlib.suppress(OSError):
                for line in (self.folder / "server.log").read_text(errors="replace").splitlines():
                    print(f"warning: stage server: {line}", file=sys.stderr)
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


@contextlib.contextmanager
def serving(env: Mapping[str, str] | None = None) -> Iterator[dict[str, str]]:
    """A :class:`Server` for the ``with`` block; yields the environment for its commands."""
    server = Server(env)
    try:
        yield server.start()
    finally:
        server.stop()


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["run"] and len(argv) > 1:
        client(argv[1:])
    if argv[:1] == ["serve"] and len(argv) == 2:
        serve(argv[1])
        sys.stderr.flush()
        os._exit(0)  # without tearing down the imports (1-4 s), as the stages leave
    if argv[:1] == ["--"] and len(argv) > 1:
        import subprocess

        with serving() as env:
            return subprocess.call(argv[1:], env=env)
    print("usage: python -m mnistlab.stageserver -- COMMAND [ARGS...]\n"
          "       python -m mnistlab.stageserver run SCRIPT [ARGS...]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

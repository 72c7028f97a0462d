"""User-facing errors and the one wrapper every stage script runs under."""

from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import NoReturn


class MnistlabError(Exception):
    """A problem caused by the user's input (a file, a param, a URL).

    The message is one line that names the culprit; stages print it without a
    traceback and exit non-zero. Anything else is a bug and keeps its traceback.
    """


class UnsafeFileError(MnistlabError):
    """A tensor file that would import and call code when unpickled (refused, never run).

    Kept apart from other unreadable files so that the message (and a test) can tell a
    planted payload, possibly malicious, from a merely damaged file. Both stop the stage
    with the file left in place; neither is ever silently overwritten.
    """


# --------------------------------------------------------------------------- stop signals

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGINT, SIGHUP) arrived; raised where the main thread was.

    A KeyboardInterrupt, so nothing that catches ``Exception`` swallows it, and every
    ``finally`` and ``except BaseException`` clean-up runs on the way out (the train stage
    marks its MLflow run KILLED). :func:`run_stage` turns it into one ``error:`` line and
    exit 128 + the signal's number, the code a shell reports for a process the signal
    killed. ``where`` is what the stage adds: what was stopped and how to resume it.
    """

    def __init__(self, signum: int, where: str = ""):
        super().__init__(signum)
        self.signum, self.where = signum, where

    def __str__(self) -> str:
        try:
            name = signal.Signals(self.signum).name
        except ValueError:
            name = f"signal {self.signum}"
        return f"stopped by {name}" + (f" {self.where}" if self.where else "")


def stop_on_signals() -> dict[int, object]:
    """From now on SIGTERM, SIGINT and SIGHUP raise :class:`Stopped` in the main thread;
    returns the handlers replaced (for :func:`signal.signal` to put back).

    Why: Python dies of SIGTERM and SIGHUP on the spot, without a word and without
    running any clean-up (an MLflow run then stays RUNNING). A signal the process was
    started ignoring (``nohup``) stays ignored. A second signal raises again, so a
    clean-up that hangs can still be cut short. Outside the main thread: nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    previous = {}
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, stop)
    return previous


# --------------------------------------------------------------------------- failures that are not bugs

# Top-level packages whose exceptions mean "the MLflow store failed" (the server, the
# database), not a bug here: MLflow's own, and what its stores are built on.
STORE_PACKAGES = ("mlflow", "sqlalchemy", "alembic", "sqlite3")


def _chain(e: BaseException) -> list[BaseException]:
    """``e``, then what it was raised from or while handling, down to the first cause."""
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and all(cur is not x for x in chain):
        chain.append(cur)
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    return chain


def _from(e: BaseException, packages: tuple[str, ...]) -> bool:
    """Whether ``e``'s class (or a base of it) comes from one of ``packages``."""
    return any(c.__module__.partition(".")[0] in packages for c in type(e).__mro__)


def _one_line(e: BaseException) -> str:
    """``e`` in one line: ``<file>: <reason>`` for an OSError that names a file, else the
    first line of its message that says something (SQLAlchemy's first line may be only
    "(raised as a result of Query-invoked autoflush; ...)", with the cause on the next)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        files = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
        return f"{files}: {e.strerror}"
    lines = [ln.strip() for ln in str(e).splitlines()
             if ln.strip() and not ln.lstrip().startswith("(raised as a result of")]
    return lines[0] if lines else type(e).__name__


def _tracking():
    """:mod:`mnistlab.tracking` if this process has loaded it, else None.

    Every MLflow call goes through it, so it is loaded whenever an MLflow error can occur.
    Not imported here: download and split never use MLflow, and an import would make
    tracking.py (and its edits) a dependency of theirs in dvc.yaml.
    """
    return sys.modules.get("mnistlab.tracking")


def redact_text(text: str) -> str:
    """``text`` without credentials: the tracking URI as :func:`mnistlab.tracking.redact`
    shows it, and no ``scheme://user:pass@`` of any URL (MLflow puts the URI it was given,
    password included, into its messages: "API request to http://bob:...@host failed")."""
    tracking = _tracking()
    if tracking is not None:
        uri = tracking.tracking_uri()
        text = text.replace(uri, tracking.redact(uri))
    return re.sub(r"(?<=:)//[^/\s]*@", "//", text)


def describe(e: BaseException) -> str | None:
    """One redacted line for a failure that is not a bug; None for a bug (it keeps its traceback).

    Not bugs: an OSError (a full disk, a file that may not be written, the network) and any
    error of the MLflow store (:data:`STORE_PACKAGES`: the server, the database file). Why
    the deepest OSError or database error of the chain: that is the real cause ("[Errno 111]
    Connection refused", "attempt to write a readonly database"), where MLflow's own message
    is a wrapper of 1 to 90 lines. A store error names the store, credentials removed.
    """
    chain = _chain(e)
    store = any(_from(x, STORE_PACKAGES) for x in chain)
    if not store and not isinstance(e, OSError):
        return None
    db_errors = [getattr(x, "orig", None) for x in chain]  # SQLAlchemy's DBAPI error
    causes = [x for x in chain if isinstance(x, OSError) or any(x is d for d in db_errors)]
    if isinstance(e, OSError) and e.filename is not None:
        causes = [e]  # names the file: more telling than whatever it was raised from
    text = _one_line(causes[-1] if causes else e)
    if store:
        tracking = _tracking()
        uri = tracking.tracking_uri() if tracking else os.environ.get("MLFLOW_TRACKING_URI", "")
        text = f"MLflow tracking store {uri}: {text}"
    return redact_text(text)


def _fail(e: BaseException, message: str) -> NoReturn:
    """``error: <message>`` as one redacted line, and exit 2; with ``MNISTLAB_DEBUG=1`` the
    (redacted) traceback first, for when one line is not enough to find the cause."""
    if os.environ.get("MNISTLAB_DEBUG", "") not in ("", "0"):
        sys.stderr.write(redact_text("".join(traceback.format_exception(e))))
    # One line, always: a multi-line message would break the contract with CI logs.
    print(f"error: {' '.join(redact_text(message).split())}", file=sys.stderr)
    sys.exit(2)


def run_stage(main: Callable[[], int | None]) -> None:
    """Run a stage's ``main`` turning :class:`MnistlabError` into ``error: ...`` + exit 2.

    So do an OSError and an MLflow store error (:func:`describe`: one line, credentials
    removed): one error path for every stage. Anything else is a bug: its traceback,
    credentials removed, and exit 1.

    A non-zero int returned by ``main`` becomes the exit code (e.g. 1: the gate failed).
    A stop signal becomes ``error: stopped by SIG...`` + exit 128 + its number (:class:`Stopped`).
    """
    logging.basicConfig(
        level=os.environ.get("MNISTLAB_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    replaced = stop_on_signals()
    try:
        code = main()
    except MnistlabError as e:
        _fail(e, str(e))
    except Stopped as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - sorted into not-a-bug (one line) and bug below
        line = describe(e)
        if line is None:
            sys.stderr.write(redact_text("".join(traceback.format_exception(e))))
            sys.exit(1)
        _fail(e, line)
    finally:  # as they were, for a caller in the same process (a test, a notebook)
        for sig, handler in replaced.items():
            signal.signal(sig, handler)
    if code:
        sys.exit(code)


# --------------------------------------------------------------------------- leaving a command


def exit_process(code: object = 0) -> NoReturn:
    """Leave the process now with ``code`` (what ``sys.exit`` takes), without tearing Python down.

    Why: freeing every object and module of an interpreter that imported torch, MLflow (with
    SQLAlchemy), scikit-learn and matplotlib takes 1.1-1.7 s of CPU on the 2-core machines
    here, after the stage's work is done and its outputs are in place, and ``dvc repro``
    waits for it before the next stage: about as long as DVC's own bookkeeping of a stage,
    20 times per dataset, and ~400 times in the test suite.

    What still happens, as at a normal exit: every ``atexit`` handler (logging's flush and
    close, ``weakref.finalize`` and tempfile clean-ups, MLflow's temporary folders,
    coverage), then stdout and stderr are flushed. What is skipped is the teardown itself
    (nothing is written there: the stages write every output to a temp file and rename it,
    closed, before they return). Where a non-daemon thread is still running, whose work a
    normal exit would wait for, this is a plain ``sys.exit`` instead.
    """
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): the message to stderr, status 1
        print(code, file=sys.stderr)
        status = 1
    main = threading.main_thread()
    if any(t.is_alive() and not t.daemon and t is not main for t in threading.enumerate()):
        sys.exit(status)
    try:
        atexit._run_exitfuncs()  # CPython's own call at exit; public API has none
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more to say
                pass
        os._exit(status & 0xFF)


def exit_after(command: Callable[[], object]) -> NoReturn:
    """Run ``command``, then :func:`exit_process` with the exit code it gives (its
    ``SystemExit``'s, else 0): the top level of a command whose ``main`` already reports
    its errors through :func:`run_stage` (``mnistlab.predict``, ``mnistlab.export``)."""
    try:
        command()
    except SystemExit as e:
        exit_process(e.code)
    exit_process(0)


def run_script(main: Callable[[], int | None]) -> NoReturn:
    """:func:`run_stage` for a command's top level (``if __name__ == "__main__":``), then
    :func:`exit_process` with its exit code. In-process callers (tests) use ``run_stage``."""
    exit_after(lambda: run_stage(main))

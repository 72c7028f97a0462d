"""User-facing errors and the one wrapper every stage script runs under."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable


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


def run_stage(main: Callable[[], int | None]) -> None:
    """Run a stage's ``main`` turning :class:`MnistlabError` into ``error: ...`` + exit 2.

    A non-zero int returned by ``main`` becomes the exit code (e.g. 1: the gate failed).
    """
    logging.basicConfig(
        level=os.environ.get("MNISTLAB_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        code = main()
    except MnistlabError as e:
        # One line, always: a multi-line message would break the contract with CI logs.
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    if code:
        sys.exit(code)

"""``python stagetimer.py stages/<name>.py ARGS...``: run a stage script, recording when it began work.

benchmarks/pipeline.py starts every stage through this (``MNISTLAB_PYTHON`` points at a
wrapper that calls it), so that a stage's wall time splits into start-up (interpreter and
imports: from the process's creation until the stage's ``main`` is entered) and work. Appends
one JSON line ``{"argv", "start", "main", "end", "exit"}`` (epoch seconds) to the file named by
``$MNISTLAB_STAGE_TIMES``; the stage itself runs unchanged, exit code included.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time

import psutil

start = psutil.Process().create_time()  # before this file ran: the interpreter's start counts
marks: dict[str, float] = {}

import mnistlab.errors as errors  # noqa: E402 - after the start mark, like the stage's own imports

run_stage = errors.run_stage


def timed(main):
    marks["main"] = time.time()
    return run_stage(main)


# Every stage script enters through run_stage, imported from mnistlab.errors (directly, or by
# mnistlab.stages for its cli) only when the script runs, so after this patch.
errors.run_stage = timed
script, sys.argv = sys.argv[1], sys.argv[1:]
code: object = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code
    raise
finally:
    with open(os.environ["MNISTLAB_STAGE_TIMES"], "a") as f:
        f.write(json.dumps({"argv": sys.argv, "start": start, "main": marks.get("main"),
                            "end": time.time(), "exit": code}) + "\n")

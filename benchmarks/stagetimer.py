"""``python stagetimer.py stages/<name>.py ARGS...``: run a stage script, recording when it began work
and how much of its work was MLflow.

benchmarks/pipeline.py starts every stage through this (``MNISTLAB_PYTHON`` points at a
wrapper that calls it), so that a stage's wall time splits into start-up (interpreter and
imports: from the process's creation until the stage's ``main`` is entered), MLflow and the
rest of its work. Appends one JSON line ``{"argv", "start", "main", "end", "exit", "mlflow"}``
(epoch seconds; ``mlflow`` in seconds) to the file named by ``$MNISTLAB_STAGE_TIMES``; the stage
itself runs unchanged, exit code included.

MLflow's share is sampled, not instrumented: every :data:`INTERVAL` seconds a daemon thread
looks at the main thread's stack, and the time since the last look counts as MLflow when any
frame is in MLflow's package or in ``mnistlab/tracking.py``. So it covers every way a stage
reaches MLflow (the tracking module, an ``MlflowClient`` used directly, ``mlflow.pytorch``'s
``log_model`` and its ``torch.export``, MLflow's lazy import and its store's schema check)
without a list of functions to keep in step with the code; per-epoch logging is in it too.
The error is a few intervals per stage; the look costs tens of microseconds, well under 1 %.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import threading
import time

import psutil

start = psutil.Process().create_time()  # before this file ran: the interpreter's start counts
marks: dict[str, float] = {}
INTERVAL = 0.005
MLFLOW_FILES = (f"{os.sep}mlflow{os.sep}", f"{os.sep}mnistlab{os.sep}tracking.py")

import mnistlab.errors as errors  # noqa: E402 - after the start mark, like the stage's own imports

run_stage = errors.run_stage


def in_mlflow(frame) -> bool:
    """Whether any frame of this stack runs MLflow's code (or mnistlab's tracking module)."""
    while frame is not None:
        name = frame.f_code.co_filename
        if any(m in name for m in MLFLOW_FILES):
            return True
        frame = frame.f_back
    return False


class MlflowSampler(threading.Thread):
    """Sums the wall time the main thread spends with MLflow on its stack (see the module doc)."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="stagetimer-mlflow")
        self.main = threading.main_thread().ident
        self.seconds = 0.0
        self.stopped = threading.Event()

    def run(self) -> None:
        last = time.perf_counter()
        while not self.stopped.wait(INTERVAL):
            now = time.perf_counter()
            # after main only: an import of MLflow at start-up is start-up's
            if "main" in marks and in_mlflow(sys._current_frames().get(self.main)):
                self.seconds += now - last
            last = now


def timed(main):
    marks["main"] = time.time()
    return run_stage(main)


# Every stage script enters through run_stage, imported from mnistlab.errors (directly, or by
# mnistlab.stages for its cli) only when the script runs, so after this patch.
errors.run_stage = timed
script, sys.argv = sys.argv[1], sys.argv[1:]
code: object = 0
sampler = MlflowSampler()
sampler.start()
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code
    raise
finally:
    sampler.stopped.set()
    sampler.join()
    with open(os.environ["MNISTLAB_STAGE_TIMES"], "a") as f:
        f.write(json.dumps({"argv": sys.argv, "start": start, "main": marks.get("main"),
                            "end": time.time(), "exit": code, "mlflow": sampler.seconds}) + "\n")

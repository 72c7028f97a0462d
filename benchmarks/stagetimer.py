"""``python stagetimer.py stages/<name>.py ARGS...``: run a stage script, recording when it began work
and how much of its work was MLflow.

benchmarks/pipeline.py starts every stage through this (``MNISTLAB_PYTHON`` points at a
wrapper that calls it), so that a stage's wall time splits into start-up (interpreter and
imports: from the process's creation until the stage's ``main`` is entered), MLflow and the
rest of its work. Appends one JSON line ``{"argv", "start", "main", "end", "exit", "mlflow"}``
(epoch seconds; ``mlflow`` in seconds; ``served``: forked from the stage server) to the file named
by ``$MNISTLAB_STAGE_TIMES``; the stage itself runs unchanged, exit code included. A served stage's
process is created by the server's fork, so its start-up is what the fork still imports (mnistlab);
its client's own ~0.05 s (an interpreter that imports nothing heavy) falls outside every stage
process, with DVC's time.

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


def process_start() -> float:
    """When this process was created (epoch seconds): the interpreter's own start-up counts.

    On Linux from /proc/self/stat's start time (clock ticks since boot) and the boot instant
    from CLOCK_BOOTTIME, precise to a tick; psutil's create_time adds the start time to the
    kernel's boot time in whole seconds (btime), up to a second early, always the same
    amount on one machine, which would move that much from DVC's time to start-up.
    """
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, ValueError, IndexError):
        return psutil.Process().create_time()


start = process_start()
# Forked from the stage server (mnistlab.stageserver), whose imports this process did not pay for.
served = "torch" in sys.modules
marks: dict[str, float] = {}
INTERVAL = 0.005
MLFLOW_FILES = (f"{os.sep}mlflow{os.sep}", f"{os.sep}mnistlab{os.sep}tracking.py")

import mnistlab.errors as errors  # noqa: E402 - after the start mark, like the stage's own imports

run_stage, exit_process = errors.run_stage, errors.exit_process


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


def record(code: object) -> None:
    """Append this stage's line (once: the fast exit and the ``finally`` below may both get here)."""
    if "end" in marks:
        return
    marks["end"] = time.time()
    sampler.stopped.set()
    sampler.join()
    with open(os.environ["MNISTLAB_STAGE_TIMES"], "a") as f:
        f.write(json.dumps({"argv": sys.argv, "start": start, "main": marks.get("main"),
                            "end": marks["end"], "exit": code, "mlflow": sampler.seconds,
                            "served": served}) + "\n")


def timed_exit(code: object = 0):
    record(code)
    return exit_process(code)


# Every stage script enters through run_stage and leaves through exit_process (errors.run_script,
# directly or by mnistlab.stages' cli), looked up in mnistlab.errors when the script runs, so
# after these patches. The line is written before the process ends without Python's teardown.
errors.run_stage, errors.exit_process = timed, timed_exit
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
    record(code)

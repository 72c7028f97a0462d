"""How many torch (OpenMP) threads a training run uses: ``train.threads``, ``auto`` or a count.

Why not torch's default: torch starts one intra-op thread per physical core of the
machine, whatever share of it the process may really use. It ignores CPU affinity
(``taskset``, cpusets), cgroup quotas (``docker --cpus``, Kubernetes limits) and the other
runs beside it. With four or five pipelines on 2 cores (``dvc queue start -j 4``) every
process ran 2 threads; an OpenMP thread that waits at a barrier spins, so the processes'
threads spun against each other and training ran 20-140x slower (issue #14).

The rule (:func:`choose`), first match wins:

1. ``MNISTLAB_THREADS`` in the environment: a harness's override of every setting. The CI
   copies (:func:`mnistlab.ci.copies.run_shards`) set it, so the gate's baseline never
   depends on the core count, whatever params.yaml says.
2. ``train.threads: N``: exactly N.
3. ``OMP_NUM_THREADS`` (its first level): the user, ``torchrun`` or a scheduler said so.
4. ``auto``: the usable cores (the affinity mask, capped by a cgroup v2 ``cpu.max`` or v1
   CFS quota; :func:`usable_cores`) shared among the training runs of this user that
   hold a slot right now (:class:`Slots`): ``cores // runs``, the remainder going to the
   lowest slots, at least 1. One run alone gets every usable core; 4 runs on 2 cores get
   1 thread each (no OpenMP barrier to spin at: the kernel time-slices them fairly).

How concurrent runs are counted: DVC tells a stage nothing about its neighbours. A queued
experiment gets ``DVC_EXP_NAME``/``DVC_EXP_BASELINE_REV``, every stage ``DVC_STAGE``/``DVC_ROOT``,
but no worker index or ``-j``; two ``dvc repro`` in two clones or a shell loop share even
less. ``/proc/loadavg`` counts every runnable thread on the machine, including the runs'
own OpenMP threads and unrelated load, so it drifts with what it measures. Instead each
run takes a slot, an exclusive ``flock`` on one of the files ``slot-00`` ... ``slot-63`` in
a per-user directory (``/tmp/mnistlab-threads-<uid>``, or ``$MNISTLAB_THREAD_SLOTS``), and
counts the slots that are locked. The kernel drops a lock when its process ends, however it
ends (kill -9 included), so a crashed run is never counted; nothing is parsed or guessed.

The count is taken once, right before training starts, and kept for the whole run: CPU
kernels split their reductions by thread count, so the thread count changes the weights'
last bits (deterministic: true means bit-identical *at a given thread count*). Fixing it at
the start means the count recorded in train.json and MLflow (``threads``) is the one the
weights were made with: a rerun with ``train.threads`` pinned to it (or MNISTLAB_THREADS)
reproduces them. The price: a run that started alone keeps every core when others start
later (they then take their share of the rest, at least 1 thread each), and runs that
finish do not hand their cores to the ones still going. The slot is taken when the stage
begins and the count read after the data is loaded, so runs launched together (a queue's
workers, ``benchmarks/concurrency.py``) see each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from mnistlab.errors import MnistlabError

log = logging.getLogger(__name__)

AUTO = "auto"
OVERRIDE_ENV = "MNISTLAB_THREADS"      # a harness's override of train.threads
SLOTS_ENV = "MNISTLAB_THREAD_SLOTS"    # the slot directory (default: per user under /tmp)
MAX_SLOTS = 64
CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


# --------------------------------------------------------------------------- usable cores


def affinity_cores() -> int:
    """CPUs this process may run on (its affinity mask; all CPUs where there is none, e.g. macOS)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _quota_v2(directory: Path) -> float | None:
    """CPUs allowed by ``cpu.max`` ("<quota> <period>"; "max ..." is none) in ``directory``."""
    text = _read(directory / "cpu.max")
    if not text:
        return None
    parts = text.split()
    if parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _quota_v1(directory: Path) -> float | None:
    """CPUs allowed by ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none) in ``directory``."""
    text = _read(directory / "cpu.cfs_quota_us")
    if not text:
        return None
    try:
        quota = int(text)
        period = int(_read(directory / "cpu.cfs_period_us") or 100_000)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _up_to(root: Path, rel: str) -> list[Path]:
    """``root/rel`` and each of its ancestors up to ``root`` itself."""
    parts = [p for p in rel.split("/") if p and p not in (".", "..")]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """CPUs the cgroup CPU quota allows this process (the tightest along its cgroup path), or None.

    ``self_cgroup`` (``/proc/self/cgroup``) names the process's cgroup per hierarchy: ``0::<path>``
    for cgroup v2 (``root/<path>/cpu.max``), ``<n>:cpu,cpuacct:<path>`` for v1
    (``root/cpu,cpuacct/<path>/cpu.cfs_quota_us``). Every ancestor up to the mount point is
    read too: a quota set on a parent binds its children, and inside a container without a
    cgroup namespace the path names a folder that is not mounted there (the container's own
    limit is then at the mount's top).
    """
    dirs: list[tuple[Path, bool]] = []  # (folder, is v2)
    for line in (_read(self_cgroup) or "").splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hier, controllers, rel = fields
        if hier == "0" and controllers == "":
            dirs += [(d, True) for d in _up_to(root, rel)]
        elif "cpu" in controllers.split(","):
            for mount in dict.fromkeys([controllers, "cpu", "cpu,cpuacct"]):
                dirs += [(d, False) for d in _up_to(root / mount, rel)]
    # No /proc/self/cgroup (or nothing in it): the mount's top level of either version.
    dirs += [(root, True), (root / "cpu", False), (root / "cpu,cpuacct", False)]
    limits = [q for d, v2 in dict.fromkeys(dirs)
              if (q := (_quota_v2(d) if v2 else _quota_v1(d))) is not None]
    return min(limits) if limits else None


def usable_cores(affinity: int | None = None, cgroup_root: Path = CGROUP_ROOT,
                 self_cgroup: Path = SELF_CGROUP) -> int:
    """CPUs this process can really use: its affinity mask (``affinity``: given, or read) capped
    by the cgroup quota (:func:`cgroup_cpu_limit`, rounded down), at least 1.

    Rounded down: with a quota of 1.5 CPUs, two threads would both be throttled a quarter
    of each period.
    """
    cores = affinity_cores() if affinity is None else affinity
    limit = cgroup_cpu_limit(cgroup_root, self_cgroup)
    if limit is not None:
        cores = min(cores, max(1, math.floor(limit)))
    return max(1, cores)


# --------------------------------------------------------------------------- the rule


def omp_threads(env: Mapping[str, str]) -> int | None:
    """``OMP_NUM_THREADS`` as a count (the first level of a nested list "4,2"), or None if unset/invalid."""
    text = (env.get("OMP_NUM_THREADS") or "").split(",")[0].strip()
    try:
        n = int(text)
    except ValueError:
        return None
    return n if n > 0 else None


@dataclasses.dataclass(frozen=True)
class Choice:
    """A thread count and where it came from (for the log line)."""

    threads: int
    source: str


def share(cores: int, runs: int, rank: int) -> int:
    """Run ``rank`` (0-based) of ``runs``' share of ``cores``: the remainder goes to the lowest ranks."""
    runs = max(1, runs)
    return max(1, cores // runs + (1 if rank < cores % runs else 0))


def choose(setting: int | str, env: Mapping[str, str], *, cores: int, runs: int = 1,
           rank: int = 0, key: str = "train.threads") -> Choice:
    """The thread count for ``setting`` (:func:`mnistlab.config.thread_setting`'s value); the rule
    is in this module's docstring. Pure: the system's state comes in as arguments."""
    override = env.get(OVERRIDE_ENV)
    if override not in (None, ""):
        try:
            n = int(override)
        except ValueError:
            n = 0
        if n <= 0:
            raise MnistlabError(f"{OVERRIDE_ENV} must be a positive integer (got {override!r})")
        return Choice(n, f"{OVERRIDE_ENV}={n}")
    if setting != AUTO:
        return Choice(int(setting), f"{key}={setting}")
    omp = omp_threads(env)
    if omp is not None:
        return Choice(omp, f"{key}=auto: OMP_NUM_THREADS={omp}")
    n = share(cores, runs, rank)
    if runs <= 1:
        return Choice(n, f"{key}=auto: {cores} usable core(s)")
    return Choice(n, f"{key}=auto: {cores} usable core(s) shared by {runs} concurrent training runs")


# --------------------------------------------------------------------------- slots


def slot_dir(env: Mapping[str, str]) -> Path:
    """``$MNISTLAB_THREAD_SLOTS``, else ``/tmp/mnistlab-threads-<uid>``.

    Why /tmp and not ``tempfile.gettempdir()``: TMPDIR may differ between the runs to be
    counted (batch schedulers set one per job); per user, because another user's
    directory is not ours to lock files in.
    """
    if env.get(SLOTS_ENV):
        return Path(env[SLOTS_ENV])
    base = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())  # noqa: S108
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return base / f"mnistlab-threads-{uid}"


class Slots:
    """Lock files ``slot-00`` ... in ``directory``: one per concurrent run, held while it runs."""

    def __init__(self, directory: Path, size: int = MAX_SLOTS):
        self.directory, self.size = Path(directory), size
        self.index: int | None = None
        self._fd: int | None = None

    def _path(self, i: int) -> Path:
        return self.directory / f"slot-{i:02d}"

    def _usable_dir(self) -> bool:
        """Create the folder (0700); refuse a symlink, a non-folder or another user's folder."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.directory)
        except OSError as e:
            log.warning("thread slots: cannot use %s (%s); counting this run alone",
                        self.directory, e.strerror or e)
            return False
        if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            log.warning("thread slots: %s is not a folder of this user; counting this run alone",
                        self.directory)
            return False
        return True

    def claim(self) -> int | None:
        """Lock the first free slot and keep it until :meth:`release` (or exit); None if none."""
        try:
            import fcntl
        except ImportError:  # not POSIX: every run counts itself alone
            return None
        if self.index is not None or not self._usable_dir():
            return self.index
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        for i in range(self.size):
            try:
                fd = os.open(self._path(i), flags, 0o600)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self.index, self._fd = i, fd
            return i
        log.warning("thread slots: all %d slots in %s are taken; counting this run alone",
                    self.size, self.directory)
        return None

    def census(self) -> tuple[int, int]:
        """(runs holding a slot, this one included; this run's rank among them, 0-based).

        A slot is held if a shared lock on it cannot be had. Testing takes that shared lock
        for an instant: a run claiming the same slot at that instant takes the next one.
        """
        if self.index is None:
            return 1, 0
        import fcntl

        held = []
        for i in range(self.size):
            if i == self.index:
                held.append(i)
                continue
            try:
                fd = os.open(self._path(i), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError:
                continue  # never created: free
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                held.append(i)
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        return len(held), held.index(self.index)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the only descriptor drops the lock
        self.index, self._fd = None, None


# --------------------------------------------------------------------------- in a stage


def set_torch_threads(n: int) -> None:
    """``n`` intra-op threads, and one inter-op thread where that can still be set.

    Inter-op threads run independent ops in parallel (TorchScript's ``fork``); nothing here
    uses them, and torch refuses a new count once its pool has started (or was set), so
    that refusal is ignored.
    """
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):
        if torch.get_num_interop_threads() != 1:
            torch.set_num_interop_threads(1)


class Lease:
    """A run's slot (taken on creation) and its thread count (:meth:`apply`, once per run)."""

    def __init__(self, env: Mapping[str, str] | None = None, slots: Slots | None = None):
        self.env = os.environ if env is None else env
        self.slots = slots or Slots(slot_dir(self.env))
        self.slots.claim()

    def choose(self, setting: int | str, key: str = "train.threads") -> Choice:
        runs, rank = self.slots.census()
        return choose(setting, self.env, cores=usable_cores(), runs=runs, rank=rank, key=key)

    def apply(self, setting: int | str, key: str = "train.threads", tag: str = "") -> int:
        """Count the runs now, set torch's threads, log the choice (INFO); returns the count."""
        c = self.choose(setting, key)
        set_torch_threads(c.threads)
        log.info("%s%d torch thread(s) (%s)", f"{tag}: " if tag else "", c.threads, c.source)
        return c.threads

    def release(self) -> None:
        self.slots.release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

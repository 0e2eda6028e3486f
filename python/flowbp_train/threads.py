"""The CPU thread policy of the console entry points, set before torch starts its thread pool.

OpenMP reads ``OMP_NUM_THREADS`` and its wait settings once, when the runtime loads with torch. Its
default waiting is a long busy spin, which on a shared machine turns every idle worker thread into a
competitor: the miniature's main job beside one other process took 3.05 s a step by default against 0.79
s on one thread. Never spinning (``OMP_WAIT_POLICY=PASSIVE``) is safe but slow on a quiet machine, where
threads sleep and wake between every small operation: 1.03 s a step on 2 threads against 0.51 s with a
short spin (the measurements are at :data:`SPIN_COUNT`).

So a CPU run sets, before ``import torch``, one thread per core that is idle when it starts: a 0.2 s look
at ``/proc/stat`` over the cores this process may use, bounded by a cgroup CPU quota. What it sets next
depends on the entry point:
- ``flowbp-train`` and ``flowbp-eval`` (``governed``) get a short spin, ``GOMP_SPINCOUNT`` =
  :data:`SPIN_COUNT`, which is fast on a quiet machine. They also get a governor: the loop calls
  :func:`rebalance` every step, and when other work takes cores later on, the thread count drops to the
  idle cores (torch.set_num_threads; one thread never waits on another), and rises again when the cores
  are free.
- ``flowbp-mini`` and the study's one-thread workers get the passive policy.

Whatever the user chose wins: an ``OMP_*`` / ``MKL_NUM_THREADS`` variable, an explicit thread count (then
the passive policy and no governor), or ``FLOWBP_THREAD_POLICY=off``. This module imports nothing heavy
(no torch at import). What it chose is said in one line once the command's arguments are checked
(:func:`announce`), so a bad argument stays a one-line error.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import MutableMapping
from dataclasses import dataclass

__all__ = ["Governor", "ThreadPolicy", "announce", "apply_cpu_policy", "available_cores", "busy_cores",
           "choose_threads", "gpu_visible", "policy_for_eval", "policy_for_mini", "policy_for_train", "rebalance",
           "worker_policy"]

#: Variables that set the thread count: the user's choice is kept.
COUNT_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: Variables that set how idle OpenMP threads wait (GNU and Intel runtimes): the user's choice is kept.
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
#: ``FLOWBP_THREAD_POLICY=off`` leaves the environment exactly as it is.
SWITCH_VAR = "FLOWBP_THREAD_POLICY"
#: How long the idle cores are looked at: long enough for a few scheduler ticks (10 ms each) on every
#: core, short beside the shortest CPU job (the 30 s main job).
SAMPLE_SECONDS = 0.2
#: GNU OpenMP's spin before an idle thread sleeps, for a governed run (the runtime's default is 300000;
#: 0 is the passive policy). Measured on the main job (2 threads, 12 steps, median step): quiet 0.51 s at
#: 10000 (0.53 s by default, 0.65 s at 1000, 1.03 s passive); beside a process started after the run
#: 3.3 s at 10000, which the governor turns into one thread (0.76 s) within :data:`CHECK_SECONDS`.
SPIN_COUNT = 10000
#: How often the governor looks at the load (a read of /proc/stat; the loop calls it every step).
CHECK_SECONDS = 2.0


@dataclass
class ThreadPolicy:
    """What :func:`apply_cpu_policy` decided (also written to the environment it was given)."""

    threads: int | None  #: the thread count set (None: left to the user or to torch)
    wait_policy: str | None  #: the wait policy set (None: left as it was)
    cores: int  #: cores this process may use
    busy: float | None  #: cores found busy when sampled (None: not sampled)
    note: str  #: why, in words

    def describe(self, prog: str) -> str:
        """One line for the log."""
        return f"{prog}: CPU threads: {self.note}"



def _wait_policy(env: dict, notes: list[str], spin: bool = False) -> str | None:
    """The wait settings in ``env`` unless the user set a wait variable (noted either way): a short spin
    (``GOMP_SPINCOUNT``, a governed run) or ``OMP_WAIT_POLICY=PASSIVE``; returns what was set."""
    user_wait = next((v for v in WAIT_VARS if env.get(v, "").strip()), None)
    if user_wait is not None:
        notes.append(f"{user_wait}={env[user_wait]} (yours)")
        return None
    if spin:
        env["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
        notes.append(f"GOMP_SPINCOUNT={SPIN_COUNT}, fewer threads when other work takes cores")
        return f"GOMP_SPINCOUNT={SPIN_COUNT}"
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    notes.append("OMP_WAIT_POLICY=PASSIVE")
    return "PASSIVE"


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, bounded by a cgroup v2 (or v1) CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:  # cgroup v2: "max 100000" or "200000 100000"
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", encoding="ascii") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us", encoding="ascii") as f:
            period = int(f.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _cpu_times(cpus: set[int] | None) -> tuple[float, float] | None:
    """(busy, total) jiffies summed over ``cpus`` (all if None), from /proc/stat; None where unreadable."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = total = 0.0
    found = False
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            index = int(name[3:])
            fields = [float(v) for v in rest.split()]
        except ValueError:
            continue
        if cpus is not None and index not in cpus:
            continue
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        used = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
        busy += used - idle
        total += used
        found = True
    return (busy, total) if found else None


def _affinity() -> set[int] | None:
    """The CPUs this process may run on (None where the platform does not say)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many of this process's cores other work kept busy over the next ``seconds`` (this process
    sleeps meanwhile); None where /proc/stat cannot be read (not Linux)."""
    cpus = _affinity()
    first = _cpu_times(cpus)
    if first is None:
        return None
    time.sleep(seconds)
    second = _cpu_times(cpus)
    if second is None or second[1] <= first[1]:
        return None
    n = len(cpus) if cpus is not None else (os.cpu_count() or 1)
    return max(0.0, min(float(n), n * (second[0] - first[0]) / (second[1] - first[1])))


def choose_threads(cores: int, busy: float | None, processes: int = 1) -> int:
    """One thread per idle core, shared among ``processes`` (ranks or workers) of this job; at least 1."""
    idle = cores if busy is None else cores - busy
    return max(1, min(cores, math.floor(idle + 0.5)) // max(1, processes))


class Governor:
    """Keeps a CPU run's thread count at the cores other work leaves idle, checked at most every
    ``check_seconds`` from the loop (:meth:`step`). Other work's load over the last interval is the
    cores' busy time from /proc/stat less this process's own CPU time. A change needs two checks in a row
    that agree, so one burst of another process does not move it."""

    def __init__(self, cores: int, threads: int, *, check_seconds: float = CHECK_SECONDS, clock=time.monotonic,
                 cpu_times=None, own_time=time.process_time):
        self.cores, self.threads = cores, threads  # the count set now; at most ``cores`` (choose_threads)
        self.check_seconds, self.clock, self.own_time = check_seconds, clock, own_time
        cpus = _affinity()  # the same cores busy_cores looked at
        self.cpu_times = cpu_times or (lambda: _cpu_times(cpus))
        self.hz = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        self.changes: list[tuple[int, int, float]] = []  # (from, to, other work's cores)
        self._pending: int | None = None
        self._last = self._sample()

    def _sample(self):
        return self.clock(), self.cpu_times(), self.own_time()

    def others(self, before, after) -> float | None:
        """Cores other work kept busy between two samples (None where /proc/stat is unreadable)."""
        (t0, c0, o0), (t1, c1, o1) = before, after
        if c0 is None or c1 is None or t1 <= t0:
            return None
        busy = (c1[0] - c0[0]) / self.hz - (o1 - o0)
        return max(0.0, min(float(self.cores), busy / (t1 - t0)))

    def step(self) -> int | None:
        """Look at the load when ``check_seconds`` have passed; returns the new thread count when it
        changed (torch's is set), else None."""
        now = self.clock()
        if now - self._last[0] < self.check_seconds:
            return None
        sample = self._sample()
        others, self._last = self.others(self._last, sample), sample
        if others is None:
            return None
        want = choose_threads(self.cores, others)
        if want == self.threads:
            self._pending = None
            return None
        if self._pending != want:  # the first check that disagrees: wait for a second one
            self._pending = want
            return None
        import torch

        torch.set_num_threads(want)
        self.changes.append((self.threads, want, others))
        self.threads, self._pending = want, None
        return want


_governor: Governor | None = None


def rebalance(prog: str = "flowbp") -> int | None:
    """Called by a governed loop every step (cheap: a clock read, and every ``CHECK_SECONDS`` a read of
    /proc/stat); a no-op unless the entry point's policy chose the thread count. Says a change in one line."""
    if _governor is None:
        return None
    before = _governor.threads
    new = _governor.step()
    if new is not None:
        others = _governor.changes[-1][2]
        print(f"{prog}: CPU threads: {before} -> {new} (other work keeps {others:.1f} of {_governor.cores} "
              f"cores busy)", file=sys.stderr, flush=True)
    return new


_pending: list[tuple[str, ThreadPolicy]] = []


def announce() -> None:
    """Print the line of the policy an entry point set (once; nothing if none was set). Called where the
    command's last input check has passed: ``Trainer`` before its first step, ``flowbp-eval`` and
    ``flowbp-mini`` after their argument checks."""
    while _pending:
        prog, policy = _pending.pop(0)
        print(policy.describe(prog), file=sys.stderr, flush=True)


def apply_cpu_policy(prog: str, *, threads: int | None = None, processes: int = 1,
                     environ: MutableMapping[str, str] | None = None, log: bool | str = True,
                     sample_seconds: float = SAMPLE_SECONDS, governed: bool = False) -> ThreadPolicy:
    """Set the thread count and the passive wait policy in ``environ`` (default ``os.environ``) for a
    CPU job, unless the user chose them; must run before ``import torch`` (once torch is imported in
    this process nothing is changed or said). ``threads``: a count the user gave on the command line
    (kept as given). ``processes``: how many processes of this job share the cores (ranks under
    torchrun, workers of a study). ``log``: True prints the line to stderr now, ``"later"`` when
    :func:`announce` is called, False never. ``governed``: when the count is chosen here (not the user's)
    and this is one process, a short spin instead of the passive policy and a :class:`Governor` that the
    loop's :func:`rebalance` calls consult (only for ``os.environ``: a real process)."""
    global _governor
    env = os.environ if environ is None else environ
    cores = available_cores()
    chosen = False
    if env.get(SWITCH_VAR, "").strip().lower() in ("off", "0", "no", "false"):
        policy = ThreadPolicy(None, None, cores, None, f"left as they are ({SWITCH_VAR}=off)")
    elif "torch" in sys.modules and environ is None:  # in-process use (a notebook, a test): too late
        return ThreadPolicy(None, None, cores, None, "left as they are (torch was already imported)")
    else:
        notes, busy = [], None
        user_count = next((v for v in COUNT_VARS if env.get(v, "").strip()), None)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
            notes.append(f"{threads} (as asked)")
        elif user_count is not None:
            threads = None
            notes.append(f"{user_count}={env[user_count]} (yours)")
        else:
            busy = busy_cores(sample_seconds)
            threads = choose_threads(cores, busy, processes)
            env["OMP_NUM_THREADS"] = str(threads)
            chosen = True
            seen = "" if busy is None else f", {busy:.1f} busy when sampled"
            share = f", shared by {processes} processes" if processes > 1 else ""
            notes.append(f"{threads} of {cores} cores{seen}{share}")
        govern = governed and chosen and processes == 1 and busy is not None
        wait = _wait_policy(env, notes, spin=govern)
        if govern and environ is None:
            _governor = Governor(cores, threads)
        policy = ThreadPolicy(threads, wait, cores, busy, ", ".join(notes) +
                              f" (set OMP_NUM_THREADS / OMP_WAIT_POLICY, or {SWITCH_VAR}=off, to choose)")
    if log == "later":
        _pending.append((prog, policy))
    elif log:
        print(policy.describe(prog), file=sys.stderr, flush=True)
    return policy


def gpu_visible(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether torch could find a GPU, judged without importing it: a CUDA or ROCm device node, not
    hidden by ``CUDA_VISIBLE_DEVICES`` / ``HIP_VISIBLE_DEVICES``."""
    env = os.environ if environ is None else environ
    for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        if env.get(var) is not None and env[var].strip() in ("", "-1"):
            return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd")


def _ranks(env: MutableMapping[str, str]) -> int:
    try:
        return max(1, int(env.get("LOCAL_WORLD_SIZE") or 1))
    except ValueError:
        return 1


def policy_for_train(prog: str, recipe: str, overrides: list[str]) -> ThreadPolicy | None:
    """``flowbp-train``: the policy when the run is on the CPU (``device: cpu``, or ``auto`` with no GPU
    to be seen); None for a GPU run or a recipe that does not read (the trainer reports it)."""
    from flowbp_train.config import ConfigError, load_config  # no torch: check=False skips validation

    try:
        cfg = load_config(recipe, overrides, check=False)
    except (ConfigError, OSError, TypeError, ValueError):
        return None
    if cfg.device == "cpu" or (cfg.device == "auto" and not gpu_visible()):
        return apply_cpu_policy(prog, processes=_ranks(os.environ), log="later", governed=True)
    return None


def policy_for_eval(prog: str, argv: list[str]) -> ThreadPolicy | None:
    """``flowbp-eval``: the policy when ``--device cpu`` is given, or no ``--device`` and no GPU (not for
    ``flowbp-eval compare``, which only reads files)."""
    if argv[:1] == ["compare"]:
        return None
    device = None
    for k, arg in enumerate(argv):
        if arg == "--device" and k + 1 < len(argv):
            device = argv[k + 1]
        elif arg.startswith("--device="):
            device = arg.split("=", 1)[1]
    if device == "cpu" or (device is None and not gpu_visible()):
        return apply_cpu_policy(prog, log="later", governed=True)
    return None


def _argv_threads(argv: list[str]) -> int | None:
    """The value of ``--threads N`` / ``--threads=N`` when it is a positive integer (else the CLI reports it)."""
    for k, arg in enumerate(argv):
        text = argv[k + 1] if arg == "--threads" and k + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--threads=") else None)
        if text is not None:
            try:
                n = int(text)
            except ValueError:
                return None
            return n if n >= 1 else None
    return None


def policy_for_mini(prog: str, argv: list[str]) -> ThreadPolicy | None:
    """``flowbp-mini``: always the CPU; ``--threads N`` counts as the user's choice. The ``study``
    subcommand sets its workers' settings itself (:func:`worker_policy`; it only schedules and aggregates)."""
    if any(a in ("-h", "--help") for a in argv) or argv[:1] == ["study"]:
        return None
    return apply_cpu_policy(prog, threads=_argv_threads(argv), log="later")


def worker_policy(prog: str, workers: int | None = None, *, environ: MutableMapping[str, str] | None = None,
                  log: bool = True, sample_seconds: float = SAMPLE_SECONDS) -> tuple[ThreadPolicy, int]:
    """Settings for a job of parallel worker processes (the miniature study): each worker one thread
    (or the user's ``OMP_NUM_THREADS``), the passive wait policy, and as many workers as there are idle
    cores unless ``workers`` is given. Writes the workers' variables into ``environ`` (default
    ``os.environ``, which spawned workers inherit); returns the policy and the number of workers."""
    env = os.environ if environ is None else environ
    cores = available_cores()
    if env.get(SWITCH_VAR, "").strip().lower() in ("off", "0", "no", "false"):
        n = workers or cores
        policy = ThreadPolicy(None, None, cores, None, f"{n} workers, threads left as they are ({SWITCH_VAR}=off)")
    else:
        user_count = next((v for v in COUNT_VARS if env.get(v, "").strip()), None)
        per = 1
        if user_count is not None:
            try:
                per = max(1, int(env[user_count]))
            except ValueError:
                per = 1
        busy = None if workers is not None else busy_cores(sample_seconds)
        n = workers or max(1, choose_threads(cores, busy) // per)
        notes = [f"{n} worker processes of {per} thread{'s' if per > 1 else ''}"
                 + (f" ({user_count}={env[user_count]}, yours)" if user_count else "")
                 + (f"; {cores} cores, {busy:.1f} busy when sampled" if busy is not None else f"; {cores} cores")]
        if user_count is None:
            env["OMP_NUM_THREADS"] = "1"
        wait = _wait_policy(env, notes)
        policy = ThreadPolicy(per, wait, cores, busy, ", ".join(notes))
    if log:
        print(policy.describe(prog), file=sys.stderr, flush=True)
    return policy, n

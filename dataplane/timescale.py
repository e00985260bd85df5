"""How slow this machine is: one factor that every success-deciding timeout is multiplied by.

Why: the lab runs on ordinary hosts, but also in VMs under software emulation (QEMU without
KVM runs several times slower), on small CI runners and on machines loaded by other work. A
fixed timeout that is generous on a laptop (a pod server that must print READY within 20 s, a
proxy that must confirm new rules within 5 s, a probe that must be answered within 1 s) expires
there although nothing is wrong, and an allowed flow would pass for a dropped one. Waiting for
the event is always preferred; where a bound is unavoidable it is `scaled(seconds)`.

The factor:
  * is measured once per process by a short calibration (`calibrate`, well under 0.2 s on an
    ordinary machine): a fixed CPU-bound Python workload and the start of a bare Python
    interpreter (what every process the lab starts costs), in wall-clock time, so a loaded
    machine measures slow too, each compared with reference figures of an ordinary machine;
  * is clamped to [1, MAX_FACTOR] and rounded up to a step of 0.5; a machine within
    `DEAD_BAND` of the reference counts as 1, so the noise of an ordinary host changes nothing;
  * can be given instead in the environment variable `L7LAB_TIME_SCALE` (a number from 1 to
    MAX_OVERRIDE); a malformed value is an error naming the variable and what was expected;
  * is passed on: once known it is put in this process's environment (`L7LAB_TIME_SCALE`), so
    the processes a lab starts (agent, proxy, pod servers, `l7lab` commands run by tests)
    inherit it and do not measure again.

Scaling only lengthens waits for something that is expected to happen; it never makes a test
skip, and no test asserts a timing.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import cache

from .errors import SetupError

ENV = "L7LAB_TIME_SCALE"
MAX_FACTOR = 20.0  # a calibration beyond this is a hiccup, not a machine: bounds stay sane
MAX_OVERRIDE = 100.0  # a value given by hand may go further, within reason
DEAD_BAND = 1.5  # a measured ratio up to this is an ordinary machine's noise: factor 1
STEP = 0.5  # factors are multiples of this, so printed timeouts stay round

# Reference figures: wall-clock seconds on an ordinary machine (a few-year-old x86 laptop or
# cloud vCPU; a current host measures below them). CPU_LOOPS iterations of `_cpu_work`, and
# the start and exit of `python -S -c pass`.
CPU_LOOPS = 200_000
CPU_REFERENCE_S = 0.012
SPAWN_REFERENCE_S = 0.020
SAMPLES = 5  # the median of a few samples: a preemption or two do not make a machine slow


def _cpu_work(loops: int) -> int:
    x = 0
    for i in range(loops):
        x = (x * 31 + i) % 1_000_003
    return x


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _spawn() -> None:
    subprocess.run([sys.executable, "-S", "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def ratio_to_factor(ratio: float) -> float:
    """A measured slowness ratio (1 = the reference machine) as the factor to use: 1 within the
    dead band, else rounded up to a STEP, at most MAX_FACTOR."""
    if math.isnan(ratio) or ratio <= DEAD_BAND:
        return 1.0
    if ratio >= MAX_FACTOR:
        return MAX_FACTOR
    return min(MAX_FACTOR, math.ceil(round(ratio / STEP, 6)) * STEP)  # 3.0000000001 is 3


def calibrate() -> float:
    """Measure this machine now: the larger of the CPU and the process-start ratios to the
    reference, as a factor (`ratio_to_factor`)."""
    cpu = statistics.median(_timed(lambda: _cpu_work(CPU_LOOPS)) for _ in range(SAMPLES))
    ratio = cpu / CPU_REFERENCE_S
    try:
        spawn = statistics.median(_timed(_spawn) for _ in range(SAMPLES))
        ratio = max(ratio, spawn / SPAWN_REFERENCE_S)
    except OSError:  # no interpreter to start (odd embedding): the CPU figure alone
        pass
    return ratio_to_factor(ratio)


def parse(value: str) -> float:
    """The factor given in `L7LAB_TIME_SCALE`; SetupError naming the variable otherwise."""
    try:
        factor = float(value.strip())
    except ValueError:
        factor = math.nan
    if not math.isfinite(factor) or not 1.0 <= factor <= MAX_OVERRIDE:
        raise SetupError(f"{ENV}={value!r}: expected a number from 1 to {MAX_OVERRIDE:g} (how many times slower "
                         f"than an ordinary machine this one is), or leave it unset to have it measured")
    return factor


@cache
def factor() -> float:
    """This machine's slowness factor (>= 1): from `L7LAB_TIME_SCALE` if set, else calibrated
    once. Either way it is then in the environment, for the processes this one starts."""
    given = os.environ.get(ENV)
    value = parse(given) if given is not None else calibrate()
    os.environ[ENV] = f"{value:g}"
    return value


def scaled(seconds: float) -> float:
    """The timeout to use for something that takes `seconds` on an ordinary machine."""
    return seconds * factor()


def environ() -> dict[str, str]:
    """The variable that hands the factor to a child process (merge it into its environment)."""
    return {ENV: f"{factor():g}"}

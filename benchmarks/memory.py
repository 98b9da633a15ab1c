"""Extra memory a method allocates beyond its inputs, measured in a fresh process.

torch's CPU allocator keeps no statistics and tracemalloc does not see it, so the
measure is the process's resident set: in a child process that holds only the
inputs, after one warm-up call on a single image (which loads code, starts the
thread pool and fills caches that every later call reuses), freed heap memory is
returned to the system with malloc_trim(0), the kernel's peak-RSS mark is reset
(writing 5 to /proc/self/clear_refs, Linux >= 4.0), the method runs once and
extra = peak RSS (VmHWM) - RSS before the call. It counts every page the call
touches, its outputs included, whoever allocated it (torch, glibc, OpenMP);
page granularity (4 KiB) is far below the sizes that matter here.

Run as ``python -m benchmarks.memory SCENARIO MODEL BATCH METHOD``; prints JSON.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
from dataclasses import replace
from typing import Dict, Optional

from .common import load_inputs
from .methods import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_in_this_process(scenario: str, model: str, batch: int, method: str) -> Dict[str, float]:
    inp = load_inputs(scenario, model, batch)
    run = METHODS[method]
    one_image = replace(
        inp, locs=inp.locs[:1], logits=inp.logits[:1], image_sizes=inp.image_sizes[:1]
    )
    run(one_image)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    if not _reset_peak():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    before = _status_kib("VmRSS")
    out = run(inp)
    peak = _status_kib("VmHWM")
    del out
    logits_bytes = inp.logits.numel() * inp.logits.element_size()
    extra = max(0, peak - before) * 1024
    return {
        "extra_bytes": extra,
        "logits_bytes": logits_bytes,
        "extra_fraction": extra / logits_bytes,
    }


def measure(
    scenario: str, model: str, batch: int, method: str, timeout_s: float = 1800
) -> Optional[Dict[str, float]]:
    """Runs the measurement in a child process; None (and a printed reason) on failure."""
    cmd = [sys.executable, "-m", "benchmarks.memory", scenario, model, str(batch), method]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        print(f"  memory {method}: timed out after {timeout_s:.0f} s", flush=True)
        return None
    if done.returncode != 0:
        print(
            f"  memory {method}: child failed: {done.stderr.strip().splitlines()[-1:]}", flush=True
        )
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    scenario_arg, model_arg, batch_arg, method_arg = sys.argv[1:5]
    print(json.dumps(measure_in_this_process(scenario_arg, model_arg, int(batch_arg), method_arg)))

"""How many CPU threads a run trains with (`device.threads`).

torch uses one thread per core by default. On a machine where other processes hold some
cores, that is slower than fewer threads, and for a small model one thread can beat two
even on an idle machine. `auto` times a few training steps of the run's own model and
batch size at each candidate count, from 1 up to the cores free now, and keeps the
fastest. The timing runs on a copy of the model, with the RNG state put back, so the run
itself is unchanged.
"""

import copy
import os
import time
from typing import Callable

import torch
from torch import nn

from regexp.config import usable_cores

TIMED_STEPS = 3  # per candidate, after one warm-up step


def free_cores(cap: int) -> int:
    """Cores not busy with other work now (the 1-minute load average), at least 1, at most `cap`."""
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = usable_cores()
    return max(1, min(cap, cores, round(cores - busy + 1)))  # + 1: this process's own share of the load


def time_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threads: int) -> float:
    """Seconds per forward/backward/SGD step of `model` on the batch (x, y) with `threads`."""
    torch.set_num_threads(threads)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    seconds = []
    for _ in range(TIMED_STEPS + 1):
        start = time.perf_counter()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return min(seconds[1:])


def fastest_threads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cap: int,
                    timer: Callable[[nn.Module, torch.Tensor, torch.Tensor, int], float] = time_steps) -> int:
    """The thread count, from 1 to the free cores (at most `cap`), with the fastest step."""
    candidates = range(1, free_cores(cap) + 1)
    if len(candidates) == 1:
        return 1
    scratch = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        timings = {n: timer(scratch, x, y, n) for n in candidates}
    return min(timings, key=timings.get)

"""regexp.threads on a tiny model: the candidate thread counts follow the free cores, the
fastest timing wins, and choosing leaves the run's model, RNG and thread count as they were."""

import pytest
import torch
from torch import nn

from regexp import threads


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)


@pytest.fixture(autouse=True)
def _thread_count_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("load,cap,expected", [(0.0, 4, 4), (1.0, 4, 4), (2.0, 4, 3), (9.0, 4, 1), (0.0, 2, 2)])
def test_free_cores_count_the_load_but_this_process(monkeypatch, four_cores, load, cap, expected):
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, 0.0, 0.0))
    assert threads.free_cores(cap) == expected


def test_the_fastest_count_wins_and_the_run_is_left_as_it_was(monkeypatch, four_cores):
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    model, x, y = nn.Linear(4, 3), torch.randn(8, 4), torch.randint(0, 3, (8,))
    weights, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    timed = []

    def timer(scratch, xb, yb, n):  # trains its model and draws random numbers, as time_steps may
        timed.append(n)
        with torch.no_grad():
            scratch.weight.add_(torch.rand_like(scratch.weight))
        return {1: 3.0, 2: 1.0, 3: 2.0, 4: 5.0}[n]

    assert threads.fastest_threads(model, x, y, cap=4, timer=timer) == 2  # train.py caps at torch's threads
    assert timed == [1, 2, 3, 4]
    assert all(torch.equal(model.state_dict()[k], w) for k, w in weights.items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_one_free_core_is_one_thread_without_timing(monkeypatch, four_cores):
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (8.0, 0.0, 0.0))
    assert threads.fastest_threads(nn.Linear(2, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), cap=4,
                                   timer=lambda *a: pytest.fail("timed with one candidate")) == 1


def test_time_steps_is_a_positive_time_with_the_threads_asked_for():
    seconds = threads.time_steps(nn.Linear(4, 3), torch.randn(8, 4), torch.randint(0, 3, (8,)), 1)
    assert seconds > 0 and torch.get_num_threads() == 1


@pytest.mark.parametrize("deterministic,expected", [(True, 1), (False, 3)])
def test_a_deterministic_cpu_run_trains_on_one_thread_without_timing(monkeypatch, deterministic, expected):
    """The thread count changes float sums, so a count timed against the load would make two
    deterministic runs of one config differ; `auto` then means 1 and nothing is timed."""
    from types import SimpleNamespace

    from regexp import train

    monkeypatch.setattr(train, "fastest_threads", lambda *a, **k: 3)
    cfg = SimpleNamespace(device=SimpleNamespace(threads="auto", deterministic=deterministic), batch_size=2)
    data = SimpleNamespace(train_x=torch.zeros(4, 2), train_y=torch.zeros(4, dtype=torch.long))
    assert train.threads_for(cfg, nn.Linear(2, 2), data, torch.device("cpu"), None) == expected
    assert torch.get_num_threads() == expected

"""math-verify timeouts from the main thread, worker threads and worker processes.

The rule (``fedmoa.rewards.math_reward``): an answer whose check runs past ``timeout`` scores 0.0,
wherever ``math_accuracy`` is called, and never raises a signal error. ``SLOW`` makes math-verify's
comparison run into its timeout (it logs "Timeout during comparison").
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

from fedmoa.rewards import math_accuracy, math_reward

SLOW = r"\boxed{9^{9^{9^{9}}}}"
COMPLETIONS = [SLOW, r"\boxed{2}", r"\boxed{5}"]
ANSWERS = ["1", "2", "3"]
EXPECTED = [0.0, 1.0, 0.0]
GENEROUS_S = 60  # only catches a hang: one check takes ~1 s, a stuck one forever


def score(timeout: float = 1) -> list[float | None]:
    return math_accuracy(None, COMPLETIONS, ANSWERS, timeout=timeout)


def test_main_thread_times_out_and_restores_the_alarm() -> None:
    handler = signal.getsignal(signal.SIGALRM)
    began = time.perf_counter()
    assert score() == EXPECTED
    assert time.perf_counter() - began < GENEROUS_S
    assert signal.getsignal(signal.SIGALRM) is handler
    assert signal.alarm(0) == 0  # no alarm left pending


def test_concurrent_threads_time_out() -> None:
    results: list[Any] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(score())
        except BaseException as exc:  # a signal error would land here
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GENEROUS_S)
    assert not errors and results == [EXPECTED] * 3


def test_spawned_process_times_out() -> None:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.apply_async(math_accuracy, (None, COMPLETIONS, ANSWERS), {"timeout": 1})
        assert result.get(GENEROUS_S) == EXPECTED


def test_process_pool_times_out_on_its_workers_main_threads() -> None:
    """Forked workers (the Linux default) drop the parent's checker process and work alone."""
    on_thread(score)  # leave a checker process running in the parent first
    assert math_reward._WORKER._proc is not None
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(score) for _ in range(2)]
        assert [f.result(GENEROUS_S) for f in futures] == [EXPECTED] * 2


def on_thread(func: Any) -> Any:
    """``func()`` on a new thread; its result."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(func()))
    thread.start()
    thread.join(GENEROUS_S)
    return out[0] if out else None


def test_fractional_timeouts_round_up() -> None:
    """signal.alarm takes whole seconds: 0.5 used to fail every check, scoring right answers 0."""
    assert math_accuracy(None, [r"\boxed{2}"], ["2"], timeout=0.5) == [1.0]
    assert on_thread(lambda: math_accuracy(None, [r"\boxed{2}"], ["2"], timeout=0.5)) == [1.0]


def test_a_stuck_checker_process_hits_the_batch_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hang that math-verify's own alarm cannot end (here: the child is stopped) costs the batch
    its scores (0.0), not the run; the next batch starts a fresh child."""
    monkeypatch.setattr(math_reward, "_BATCH_SLACK_S", 1.0)
    assert on_thread(score) == EXPECTED
    proc = math_reward._WORKER._proc
    assert proc is not None and proc.poll() is None
    os.kill(proc.pid, signal.SIGSTOP)
    assert on_thread(score) == [0.0, 0.0, 0.0]
    assert proc.poll() is not None, "the stuck child is killed"
    assert on_thread(score) == EXPECTED

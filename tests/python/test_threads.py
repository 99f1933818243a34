"""Threads and processes: concurrent Python threads get the single-threaded answers, the GIL is
released during long calls, and a process that forks after using luong keeps working."""

from __future__ import annotations

import os
import threading
import time
import warnings

import numpy as np

import luong


def _inputs(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((4, 96, 32)).astype(np.float32)
    k = rng.standard_normal((4, 80, 32)).astype(np.float32)
    v = rng.standard_normal((4, 80, 16)).astype(np.float32)
    return q, k, v


def test_concurrent_threads_get_single_threaded_answers() -> None:
    cases = [_inputs(s) for s in range(6)]
    want = [luong.attention(q, v, k, use_causal_mask=True) for q, k, v in cases]
    got: dict[tuple[int, int], np.ndarray] = {}

    def work(t: int) -> None:
        for rep in range(20):
            i = (t + rep) % len(cases)
            q, k, v = cases[i]
            got[(t, rep)] = luong.attention(q, v, k, use_causal_mask=True)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 * 20
    for (t, rep), out in got.items():
        np.testing.assert_array_equal(out, want[(t + rep) % len(cases)])


def test_gil_is_released_during_a_long_call() -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((8, 1024, 64)).astype(np.float32)
    luong.set_num_threads(1)
    ticks = 0
    done = threading.Event()

    def spin() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1

    try:
        t0 = time.perf_counter()
        luong.attention(q, q)
        alone = time.perf_counter() - t0
        th = threading.Thread(target=spin)
        th.start()
        time.sleep(0.01)  # let the spinner hold the GIL first
        start = ticks
        for _ in range(3):
            luong.attention(q, q)
        during = ticks - start
        done.set()
        th.join()
    finally:
        luong.set_num_threads(2)
    # With the GIL held by the kernel the spinner would stall for the whole calls; it keeps
    # counting instead (a few thousand increments per millisecond of free GIL).
    assert alone > 0.005, "the call is too short to tell"
    assert during > 1000, during


def test_fork_after_use_keeps_working_in_the_child() -> None:
    q, k, v = _inputs(1)
    want = luong.attention(q, v, k)
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a multi-threaded process may deadlock; luong's pool is
        # rebuilt in the child, which is what this test checks.
        warnings.simplefilter("ignore", DeprecationWarning)
        # JAX (the gradient tests' reference, when it ran earlier in this process) warns the same
        # from its own at-fork hook; the child never uses JAX.
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
        pid = os.fork()
    if pid == 0:
        ok = False
        try:
            ok = np.array_equal(luong.attention(q, v, k), want)
        finally:
            os._exit(0 if ok else 3)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child hung")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0


def test_kernel_isa_names_the_path_luong_takes() -> None:
    import subprocess
    import sys

    def isa(env_value: str | None) -> str:
        env = {k: v for k, v in os.environ.items() if k != "LUONG_ISA"}
        if env_value is not None:
            env["LUONG_ISA"] = env_value
        cmd = [sys.executable, "-c", "import luong; print(luong.kernel_isa())"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    best = isa(None)
    assert best in {"amx", "avx512", "avx2", "scalar"}
    assert isa("scalar") == "scalar"
    order = ["scalar", "avx2", "avx512", "amx"]
    for asked in order:
        # A set the CPU has is taken; one it lacks falls back to the best it has.
        want = asked if order.index(asked) <= order.index(best) else best
        assert isa(asked) == want, asked

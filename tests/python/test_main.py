"""`python -m luong`, the main job: its table, its self-check, and the timing rules behind it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

import luong
from luong import __main__ as main_job
from luong._run import Options
from luong._timing import cpu_model, steady_ms, wait_until_idle


def options(mode: str = "dot", scores: bool = False) -> dict:
    return Options(score_mode=mode, return_scores=scores).to_core()


def test_the_table_names_the_cpu_the_kernels_and_every_case() -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-m", "luong", "--calls", "3"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert cpu_model() in lines[0] and f"{luong.kernel_isa()} kernels" in lines[0], lines[0]
    assert "medians of 3 calls" in lines[1], lines[1]
    rows = [line for line in lines if line.split("  ")[0].strip() in
            {label for label, *_ in main_job.CASES}]
    assert len(rows) == len(main_job.CASES), done.stdout
    for row, (_, mode, shape, causal, scores) in zip(rows, main_job.CASES):
        kernels = main_job.path(mode, shape, causal, scores)
        assert f"  {kernels}" in row, (kernels, row)
        if kernels != luong.kernel_isa():  # a row off the machine's family says so
            assert f"  {kernels}* " in row and "* not the" in done.stdout, row
    assert lines[-1].startswith("self-check: ok"), lines[-1]


def test_the_self_check_fails_on_a_wrong_result(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    reference = main_job.reference_attention

    def off_by_a_little(*args, **kwargs):
        out, weights = reference(*args, **kwargs)
        return out + 1e-3, weights

    monkeypatch.setattr(main_job, "reference_attention", off_by_a_little)
    assert main_job.main(["--calls", "1"]) == 1
    printed = capsys.readouterr().out
    assert "FAIL (tolerance" in printed and "self-check: FAILED" in printed


def test_calls_must_be_positive() -> None:
    with pytest.raises(SystemExit):
        main_job.main(["--calls", "0"])


def test_waits_while_a_thread_spins_and_not_when_idle() -> None:
    spin_for = 0.3

    def spin() -> None:
        end = time.perf_counter() + spin_for
        while time.perf_counter() < end:
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    waited = wait_until_idle(timeout=2.0)
    spinner.join()
    assert waited >= 0.2, waited
    assert wait_until_idle(timeout=2.0) < 0.15


def test_steady_ms_is_the_median_of_the_timed_calls() -> None:
    calls: list[float] = []

    def sleeper() -> None:
        calls.append(time.perf_counter())
        time.sleep(0.002 if len(calls) % 2 else 0.02)

    ms = steady_ms(sleeper, calls=5, warm=2)
    assert len(calls) == 7
    # Timed calls 3..7 sleep 2, 20, 2, 20, 2 ms: the median is a 2 ms one.
    assert 2.0 <= ms < 15.0, ms


def test_planned_isa_follows_the_dtype_the_mode_and_the_tile_gate() -> None:
    isa = luong.kernel_isa()
    big = (8, 512, 512, 64, 64)
    assert luong._core.planned_isa(big, "float32", options()) == isa
    assert luong._core.planned_isa(big, "bfloat16", options()) == isa
    assert luong._core.planned_isa(big, "float64", options()) == "scalar"
    off_tiles = "avx512" if isa == "amx" else isa
    assert luong._core.planned_isa(big, "float32", options("concat")) == off_tiles
    small = (1, 8, 8, 16, 16)
    gate_open = os.environ.get("LUONG_ISA") == "amx"
    expected = isa if gate_open else off_tiles
    assert luong._core.planned_isa(small, "float32", options()) == expected
    with pytest.raises(ValueError, match="dtype must be"):
        luong._core.planned_isa(big, "int8", options())


"""The machine's slowness factor: read from L7LAB_TIME_SCALE (validated) or calibrated once,
clamped, handed to child processes, and applied by `scaled`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dataplane import timescale
from dataplane.errors import SetupError
from tests.conftest import REPO


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """The module with no factor known yet (and the process's own restored afterwards)."""
    timescale.factor.cache_clear()
    monkeypatch.delenv(timescale.ENV, raising=False)
    yield timescale
    timescale.factor.cache_clear()


@pytest.mark.parametrize("text, expected", [("1", 1.0), ("2.5", 2.5), (" 8 ", 8.0), ("100", 100.0)])
def test_the_variable_gives_the_factor(fresh, monkeypatch: pytest.MonkeyPatch, text: str, expected: float) -> None:  # noqa: ANN001
    monkeypatch.setenv(timescale.ENV, text)
    assert fresh.factor() == expected
    assert fresh.scaled(20.0) == 20.0 * expected


@pytest.mark.parametrize("text", ["", "fast", "0.5", "0", "-3", "nan", "inf", "101", "1e9"])
def test_a_bad_value_names_the_variable_and_what_was_expected(fresh, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
                                                               text: str) -> None:
    monkeypatch.setenv(timescale.ENV, text)
    with pytest.raises(SetupError) as info:
        fresh.factor()
    message = str(info.value)
    assert timescale.ENV in message and repr(text) in message and "expected a number from 1 to 100" in message


def test_calibration_runs_once_and_hands_its_result_to_children(fresh, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    calls = []
    monkeypatch.setattr(fresh, "calibrate", lambda: calls.append(1) or 3.5)
    assert fresh.factor() == 3.5 and fresh.factor() == 3.5 and calls == [1]
    assert os.environ[timescale.ENV] == "3.5" and fresh.environ() == {timescale.ENV: "3.5"}
    # A child started now reads the factor and does not measure again.
    out = subprocess.run([sys.executable, "-c", "from dataplane import timescale as t; "
                          "t.calibrate = None; print(t.factor())"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3.5"


@pytest.mark.parametrize("ratio, factor", [
    (0.3, 1.0), (1.0, 1.0), (timescale.DEAD_BAND, 1.0),  # an ordinary machine, and its noise
    (1.6, 2.0), (2.0, 2.0), (4.1, 4.5), (7.0, 7.0),  # rounded up to a step
    (19.9, 20.0), (50.0, timescale.MAX_FACTOR), (float("inf"), timescale.MAX_FACTOR),  # clamped
    (float("nan"), 1.0),
])
def test_a_measured_ratio_becomes_a_clamped_rounded_factor(ratio: float, factor: float) -> None:
    assert timescale.ratio_to_factor(ratio) == factor


def test_calibration_measures_a_sane_factor_quickly(fresh) -> None:  # noqa: ANN001
    # No timing is asserted: only that the result is a factor within its bounds.
    measured = fresh.calibrate()
    assert 1.0 <= measured <= timescale.MAX_FACTOR and measured % timescale.STEP == 0


def test_the_calibration_compares_both_figures_with_the_reference(fresh, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    # A machine whose processes start slowly (emulation) is slow even if its loop is quick.
    times = iter([timescale.CPU_REFERENCE_S / 2] * timescale.SAMPLES + [timescale.SPAWN_REFERENCE_S * 6] * timescale.SAMPLES)
    monkeypatch.setattr(fresh, "_timed", lambda fn: next(times))
    assert fresh.calibrate() == 6.0
    times = iter([timescale.CPU_REFERENCE_S * 3] * timescale.SAMPLES + [timescale.SPAWN_REFERENCE_S / 2] * timescale.SAMPLES)
    assert fresh.calibrate() == 3.0

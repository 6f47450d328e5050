"""The timing helpers the benchmarks rely on: paired ratios survive machine drift, peak memory is the worker's own."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from vmamba_export.bench import interleaved, merge_rounds, paired_ratio


def test_paired_ratio_cancels_drift_that_sequential_timing_does_not():
    # A model 1.2x its peer on a machine whose speed drifts 1.0 -> 1.6 -> 1.1 over the rounds.
    drift = [1.0, 1.6, 1.1]
    peer = [{"median_ms": 25.0 * d, "p90_ms": 26.0 * d, "min_ms": 24.0 * d} for d in drift]
    model = [{"median_ms": 30.0 * d, "p90_ms": 31.0 * d, "min_ms": 29.0 * d} for d in drift]
    assert paired_ratio(model, peer) == pytest.approx(1.2)
    # Timing the peer in the fast round and the model in the slow one (what one sequential pass can do) is 1.92x.
    assert model[1]["median_ms"] / peer[0]["median_ms"] == pytest.approx(1.92)
    merged = merge_rounds(model)
    assert merged["median_ms"] == pytest.approx(33.0) and merged["min_ms"] == pytest.approx(29.0)
    assert merged["round_medians_ms"] == [r["median_ms"] for r in model]


def test_interleaved_runs_every_key_once_per_round_in_turn(capsys):
    order = []

    def measure(key):
        order.append(key)
        return {"median_ms": float(len(order))}

    samples = interleaved(["a", "b"], measure, rounds=3)
    assert order == ["a", "b"] * 3
    assert [r["median_ms"] for r in samples["a"]] == [1.0, 3.0, 5.0]
    assert "b: 6.0 ms" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_rss_is_the_workers_own_not_its_parents():
    """A worker started by a parent holding 1 GB must not report the parent's peak (ru_maxrss would: exec keeps it)."""
    ballast = np.ones(256 * 2**20, dtype=np.float32)  # 1 GB resident in this process
    code = "from vmamba_export.bench import peak_rss_mb; print(peak_rss_mb())"
    child_mb = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert ballast.sum() > 0
    assert child_mb < 700, child_mb  # about 220 MB here (Python, numpy, torch imported by vmamba_export)

"""The timing helpers the benchmarks rely on: paired ratios survive machine drift, peak memory is the worker's own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vmamba_export.bench import interleaved, merge_rounds, paired_ratio

ROOT = Path(__file__).resolve().parent.parent


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


def _sequential_scan(dt, x, b, c, a):
    """float64 h_t = exp(dt_t A) h_t-1 + x_t B_t, y_t = sum_n C_t h_t: (positions, 4, ., Di) inputs, A (4, N, Di)."""
    h, ys = np.zeros(a.shape), []
    for t in range(len(dt)):
        h = np.exp(dt[t] * a) * h + x[t] * b[t]
        ys.append((c[t] * h).sum(axis=1, keepdims=True))
    return np.stack(ys)


@pytest.mark.parametrize("form, chunk", [("sequential", None), ("chunked", 1), ("chunked", 3), ("chunked", 20)])
def test_portable_floor_lean_forms_compute_the_scan(form, chunk):
    # The floor benchmark times these graphs as the leanest members of their class: they must do the whole scan.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from portable_floor import _chunked_stage_session, _sequential_stage_session

    positions, di, n = 20, 8, 4  # 20 positions: chunk 3 pads the last chunk
    if form == "sequential":
        session, feeds = _sequential_stage_session(positions, di, n, threads=1)
    else:
        session, feeds = _chunked_stage_session(positions, di, n, chunk, threads=1)
    y = session.run(None, feeds)[0]
    steps = y.shape[0] * (y.shape[1] if form == "chunked" else 1)
    flat = {k: v.astype(np.float64).reshape(steps, 4, -1, v.shape[-1]) for k, v in feeds.items() if k != "A"}
    c = flat["C"].transpose(0, 1, 3, 2) if form == "chunked" else flat["C"]  # chunked takes C as (.., 1, N)
    want = _sequential_scan(flat["dt"], flat["x"], flat["B"], c, feeds["A"].astype(np.float64).reshape(4, n, di))
    np.testing.assert_allclose(y.reshape(want.shape), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_predictor_overhead_leaves_out_the_runtime_and_restores_the_backend(digits_artifact):
    from vmamba_export import load
    from vmamba_export.bench import predictor_overhead_us

    predictor = load(digits_artifact, threads=1)
    real = predictor.backend
    calls = []
    run, run_outputs = real.run, real.run_outputs
    real.run = lambda batch: calls.append(batch.shape) or run(batch)
    real.run_outputs = lambda batch: calls.append(batch.shape) or run_outputs(batch)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    overhead = predictor_overhead_us(predictor, x, calls=200)
    # The runtime ran once (the answer computed beforehand), not once per timed call; the figure is the predictor's
    # own checks, microseconds, and the real backend is back afterwards with the same outputs.
    assert calls == [(2, 3, 32, 32)]
    assert 0.0 < overhead < 5_000.0
    assert predictor.backend is real
    np.testing.assert_array_equal(predictor(x), run(x))

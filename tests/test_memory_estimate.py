"""The memory check before allocation counts what the engine will hold, not only the KV cache:
the per-width mask views of long max_length engines outweigh a small model's cache."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import engine
from engine import generation
from engine.config import load_model_spec
from engine.memory import estimate_memory
from engine.testing.synthetic import SyntheticSpec, cached_model

LONG = SyntheticSpec(layout="gqa", seed=11, context_length=32768, layers=1)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    return cached_model(LONG, tmp_path_factory.mktemp("long"))


def test_estimate_parts(long_model):
    spec = load_model_spec(long_model)
    est = estimate_memory(spec, 32768, 8)
    assert est.kv_cache == spec.kv_bytes_per_token * 32768 * 8
    assert est.weights == spec.weight_bytes
    assert est.views > est.kv_cache  # the views dominate for this small model at this length
    assert est.total == est.kv_cache + est.weights + est.buffers + est.views
    one = estimate_memory(spec, 32768, 1)
    assert one.views < est.views  # a single-request engine makes no packed batch views


def test_refused_when_views_do_not_fit(long_model, monkeypatch):
    """Memory for the KV cache alone, not for the views: refused before anything is allocated."""
    spec = load_model_spec(long_model)
    est = estimate_memory(spec, 32768, 8)
    monkeypatch.setattr(generation, "_available_memory", lambda: int((est.kv_cache + est.weights) / 0.8) + 1)
    with pytest.raises(engine.InsufficientMemoryError, match="mask views"):
        engine.Engine(long_model, max_length=32768, max_batch=8)


def test_info_reports_the_estimate(long_model):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "info",
            "--model",
            str(long_model),
            "--max-length",
            "32768",
            "--max-batch",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    est = estimate_memory(load_model_spec(long_model), 32768, 8)
    assert f"{est.total / 2**20:.1f} MiB" in out.stdout
    assert "host memory estimate" in out.stdout


@pytest.mark.slow
def test_estimate_bounds_what_is_resident(long_model):
    """Resident memory an engine adds, after batches of several row counts at full width, in a
    fresh process: the estimate must cover most of it (a KV-only count covered ~40 %) and not
    overstate it wildly."""
    code = textwrap.dedent(
        f"""
        import json, os, engine
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        r0 = rss()
        e = engine.Engine({str(long_model)!r}, max_length=32768, max_batch=8)
        for n in (2, 3, 4, 5, 8):
            s = e.stream_batch(["hello"] * n, max_new_tokens=32700)
            next(iter(s))
            s.close()
        print(json.dumps({{"grown": rss() - r0, "estimate": e.memory_estimate.total}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.8 * got["grown"] <= got["estimate"] <= 1.5 * got["grown"] + 32 * 2**20, got

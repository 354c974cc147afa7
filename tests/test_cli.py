"""The command line as a user runs it: ``python -m engine generate|chat|info``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.cli import main
from engine.testing.synthetic import SyntheticSpec, cached_model

from .conftest import load_reference


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return cached_model(SyntheticSpec(layout="gqa", seed=51), tmp_path_factory.mktemp("cli"))


def test_generate_prints_continuation_and_stats(stories260k, capsys):
    ref = load_reference(stories260k)[0]
    n = len(ref["greedy_ids"])
    assert main(["generate", "--model", str(stories260k), "--prompt", ref["prompt"], "--max-new-tokens", str(n)]) == 0
    out, err = capsys.readouterr()
    assert out == ref["continuation"] + "\n"
    assert "TTFT" in err and "tok/s" in err


def test_generate_stream_prints_the_same_text(stories260k, capsys):
    ref = load_reference(stories260k)[1]
    n = len(ref["greedy_ids"])
    args = ["generate", "--model", str(stories260k), "--prompt", ref["prompt"], "--max-new-tokens", str(n)]
    assert main([*args, "--stream"]) == 0
    out, err = capsys.readouterr()
    assert out == ref["continuation"] + "\n"
    assert "tok/s" in err


def test_generate_stop_string(stories260k, capsys):
    ref = load_reference(stories260k)[0]
    args = ["generate", "--model", str(stories260k), "--prompt", ref["prompt"], "--max-new-tokens", "64"]
    assert main([*args, "--stop", "Lily"]) == 0
    out, _ = capsys.readouterr()
    assert out == ref["continuation"].split("Lily")[0] + "\n"


def test_generate_a_batch_prints_each_reference_continuation(stories260k, capsys):
    refs = load_reference(stories260k)[:3]
    n = len(refs[0]["greedy_ids"])
    args = ["generate", "--model", str(stories260k), "--max-new-tokens", str(n), "--max-length", "128"]
    for ref in refs:
        args += ["--prompt", ref["prompt"]]
    assert main(args) == 0
    out, err = capsys.readouterr()
    expected = "".join(f"--- [{i}] length\n{ref['continuation']}\n" for i, ref in enumerate(refs))
    assert out == expected
    assert err.count("TTFT") == 3
    assert main([*args, "--stream"]) == 2
    assert "--stream takes one --prompt" in capsys.readouterr().err


def test_info(model_dir, capsys):
    assert main(["info", "--model", str(model_dir), "--max-length", "128", "--max-batch", "4"]) == 0
    out, _ = capsys.readouterr()
    for key in ("layout", "gqa_shared", "KV heads", "head size", "KV bytes per token", "vocab", "providers available"):
        assert key in out
    spec = SyntheticSpec(layout="gqa", seed=51)
    kv = 2 * spec.layers * spec.kv_heads * spec.head_size * 4 * 128 * 4  # K and V, fp32, 128 tokens, 4 rows
    assert f"KV cache (max_length 128 x max_batch 4)  {kv / 2**20:.1f} MiB" in out


def test_bad_model_is_a_clean_error(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path / "missing")]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("error: ") and "does not exist" in err


def test_bad_sampling_value_is_a_clean_error(model_dir, capsys):
    args = ["generate", "--model", str(model_dir), "--prompt", "hi", "--do-sample", "--top-p", "1.5"]
    assert main(args) == 2
    _, err = capsys.readouterr()
    assert "top_p" in err


@pytest.mark.slow
def test_chat_session_over_stdin_with_reset(model_dir):
    """A real process: two turns, /reset, a third turn, then EOF."""
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "chat", "--model", str(model_dir), "--max-new-tokens", "4"],
        input="hello\nhow are you\n/reset\nagain\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("tok/s") == 3
    assert "(history cleared)" in proc.stderr

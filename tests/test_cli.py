"""The command line as a user runs it: ``python -m engine generate|chat|info``."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys

import pytest

from engine import chat
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


# ---- hostile input: one line "error: ...", a non-zero status, never a traceback ----


def _one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--prompt", "hi", "--threads", "2147483648"],
        ["generate", "--prompt", "hi", "--threads", "0"],
        ["generate", "--prompt", "hi", "--threads", "abc"],
        ["generate", "--prompt", "hi", "--max-new-tokens", "9223372036854775808"],
        ["generate", "--prompt", "hi", "--max-new-tokens", "-1"],
        ["generate", "--prompt", "hi", "--max-length", "0"],
        ["generate", "--prompt", "hi", "--max-batch", "100000000000000000000"],
        ["generate", "--prompt", "hi", "--top-k", "-1"],
        ["generate", "--prompt", "hi", "--seed", str(2**64)],
        ["chat", "--threads", "99999999999"],
        ["info", "--max-length", "-5"],
        ["info", "--max-length", "0"],
        ["info", "--max-batch", "-1"],
        ["info", "--max-batch", "0"],
        ["info", "--max-batch", "1x"],
    ],
)
def test_absurd_numbers_are_one_line_errors(model_dir, capsys, args):
    assert main([args[0], "--model", str(model_dir), *args[1:]]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert _one_error_line(err).startswith(f"error: argument {args[-2]}: must be an integer")


def test_usage_errors_are_one_line(capsys):
    for args in (["info"], ["bogus"], [], ["info", "--model"]):
        assert main(args) == 2
        _one_error_line(capsys.readouterr().err)


def test_an_unexpected_error_is_one_line(model_dir, capsys, monkeypatch):
    import engine.cli

    def broken(args):
        raise RuntimeError("went wrong\non two lines")

    monkeypatch.setattr(engine.cli, "cmd_info", broken)
    assert main(["info", "--model", str(model_dir)]) == 1
    assert _one_error_line(capsys.readouterr().err) == "error: RuntimeError: went wrong on two lines\n"


def _with_template(model_dir, tmp_path, template: str):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    return folder


def test_template_errors_are_one_line(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(chat, "RENDER_TIMEOUT_S", 0.2)
    folder = _with_template(model_dir, tmp_path, "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}")
    args = ["generate", "--model", str(folder), "--prompt", "hi", "--chat", "--max-new-tokens", "2"]
    assert main(args) == 2  # refused at load, naming the file
    err = _one_error_line(capsys.readouterr().err)
    assert "chat_template.jinja: the chat template is not valid jinja" in err
    (folder / "chat_template.jinja").write_text(
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", encoding="utf-8"
    )
    assert main(args) == 2
    assert "the chat template took more than 0.2 s to render" in _one_error_line(capsys.readouterr().err)
    (folder / "chat_template.jinja").write_text("{{ 'x' * 10**11 }}", encoding="utf-8")
    assert main(args) == 2
    assert "which would make about 100,000,000,000 characters" in _one_error_line(capsys.readouterr().err)


def test_chat_reports_a_template_error_and_goes_on(model_dir, tmp_path, capsys, monkeypatch):
    template = (
        "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}{{ messages[0].content }}"
    )
    folder = _with_template(model_dir, tmp_path, template)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n/reset\nthird\n"))
    assert main(["chat", "--model", str(folder), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("error: the chat template rejected the conversation: one message only\n") == 1
    assert err.count("tok/s") == 2 and "Traceback" not in err


def test_generate_stream_on_a_synthetic_model(model_dir, capsys):
    args = ["generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "4"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--stream"]) == 0
    out, err = capsys.readouterr()
    assert out == plain and "tok/s" in err


def test_undecodable_command_line_bytes_become_replacement_characters(model_dir, capsys):
    # what Python makes of the argv bytes b"hi \xff": a lone surrogate, which tokenizers refuse
    args = ["generate", "--model", str(model_dir), "--max-new-tokens", "2", "--prompt", "hi \udcff", "--stop", "\ud800"]
    assert main(args) == 0
    assert "tok/s" in capsys.readouterr().err


def _engine_process(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "engine", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs
    )


@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False])
def test_a_closed_stdout_ends_quietly(model_dir, stream):
    """``engine generate ... | head -c 1``: the reader is gone before the text is written."""
    args = ["generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "64"]
    proc = _engine_process(*args, *(["--stream"] if stream else []))
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err


@pytest.mark.slow
def test_a_line_of_invalid_utf8_does_not_end_the_chat(model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "chat", "--model", str(model_dir), "--max-new-tokens", "3"],
        input=b"hello\n\xff\xfe bad \xc3\n\nagain\n",
        capture_output=True,
        timeout=120,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert err.count("tok/s") == 3 and "Traceback" not in err


def test_generate_with_speculation_prints_the_plain_text_and_the_drafts_kept(stories260k, capsys):
    """--speculation on a prompt that repeats its own text prints what a plain run prints, and the
    stats line reports the drafts kept."""
    text = "Once upon a time, there was a little girl named Lily. She loved to play. Once upon a time, there was"
    args = ["generate", "--model", str(stories260k), "--prompt", text, "--max-new-tokens", "60"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculation", "prompt_lookup", "--prefix-cache"]) == 0
    out, err = capsys.readouterr()
    assert out == plain
    assert "drafts kept" in err


def test_speculation_inexact_alone_is_a_usage_error(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "a", "--speculation-inexact"]) == 2
    err = capsys.readouterr().err
    assert "--speculation-inexact needs --speculation prompt_lookup" in err

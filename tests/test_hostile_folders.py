"""Hostile model folders: every broken file, link or field ends in the package's own error, at load,
naming the file and what is allowed; none is silently skipped or read as another kind of folder."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import engine
from engine.config import load_model_spec
from engine.errors import EngineError, InvalidRequestError, ModelFileNotFoundError, ModelLoadError
from engine.testing.synthetic import SyntheticSpec, cached_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return cached_model(SyntheticSpec(layout="gqa", seed=11), tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def canonical(model_dir) -> list[int]:
    """The greedy answer of a fresh engine on the untouched folder."""
    eng = engine.Engine(model_dir, max_length=64)
    try:
        return eng.generate("hello", max_new_tokens=6).token_ids
    finally:
        eng.close()


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    return dst


def _edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def _dec(**kv):
    return lambda c: c["model"]["decoder"].update(kv)


def _inputs(**kv):
    return lambda c: c["model"]["decoder"].setdefault("inputs", {}).update(kv)


def _session(**kv):
    return lambda c: c["model"]["decoder"].setdefault("session_options", {}).update(kv)


GENAI_EDITS = {
    "template not a string": (_inputs(past_key_names=5), "must be a string with one '%d'"),
    "template with two %d": (_inputs(past_key_names="p.%d.%d"), "exactly one '%d'"),
    "template with %s": (_inputs(past_key_names="p.%s"), "exactly one '%d'"),
    "template with %d and %s": (_inputs(past_value_names="p.%d.%s"), "exactly one '%d'"),
    "input name not a string": (_inputs(input_ids=3), "inputs.input_ids' must be a non-empty string"),
    "output name a list": (
        lambda c: c["model"]["decoder"].setdefault("outputs", {}).update(logits=[1]),
        "outputs.logits' must be a non-empty string",
    ),
    "threads 2**40": (_session(intra_op_num_threads=2**40), "intra_op_num_threads must be an int in 0..1024"),
    "threads a string": (_session(intra_op_num_threads="abc"), "intra_op_num_threads must be an int"),
    "threads a bool": (_session(inter_op_num_threads=True), "inter_op_num_threads must be an int"),
    "log level 99": (_session(log_severity_level=99), "log_severity_level must be an int in 0..4"),
    "session options a list": (_dec(session_options=[1]), "session_options must be an object"),
    "ORT entry not a string": (_session(**{"session.intra_op.allow_spinning": 1}), "must be a string"),
    "layers 10**7": (_dec(num_hidden_layers=10**7), "num_hidden_layers is 10000000 but the graph has only"),
    "context_length 1": (lambda c: c["model"].update(context_length=1), "context_length is 1: it leaves no room"),
    "model.type a list": (lambda c: c["model"].update(type=["x"]), "'model.type' must be str"),
    "search.max_length a string": (lambda c: c["search"].update(max_length="10"), "'search.max_length' must be int"),
    "filename a folder": (_dec(filename="."), "is a folder; the ONNX model must be a regular file"),
}


@pytest.mark.parametrize("case", sorted(GENAI_EDITS))
def test_bad_genai_config_fields(model_dir, tmp_path, case):
    edit, message = GENAI_EDITS[case]
    d = _copy(model_dir, tmp_path)
    _edit_json(d / "genai_config.json", edit)
    with pytest.raises(ModelLoadError, match=message):
        engine.Engine(d, max_length=64)


TOKENIZER_EDITS = {
    "bos_token an int": (lambda c: c.update(bos_token=5), "bos_token must be a string or an object"),
    "eos_token content an int": (lambda c: c.update(eos_token={"content": 5}), "eos_token must be a string"),
    "added_tokens_decoder entry an int": (
        lambda c: c.update(added_tokens_decoder={"7": 5}),
        r"added_tokens_decoder\['7'\] must be a string",
    ),
    "added_tokens_decoder key not an id": (
        lambda c: c.update(added_tokens_decoder={"x": {"content": "<x>"}}),
        "the key must be a token id",
    ),
    "added_tokens_decoder a list": (lambda c: c.update(added_tokens_decoder=[1]), "must be an object of id"),
    "add_bos_token a string": (lambda c: c.update(add_bos_token="false"), "add_bos_token must be true, false"),
    "legacy a string": (lambda c: c.update(legacy="no"), "legacy must be true, false"),
    "additional_special_tokens a string": (
        lambda c: c.update(additional_special_tokens="<x>"),
        "additional_special_tokens must be a list",
    ),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_EDITS))
def test_bad_tokenizer_config_fields(model_dir, tmp_path, case):
    edit, message = TOKENIZER_EDITS[case]
    d = _copy(model_dir, tmp_path)
    _edit_json(d / "tokenizer_config.json", edit)
    with pytest.raises(ModelLoadError, match=message):
        engine.Engine(d, max_length=64)


def _link_loop(p: Path) -> None:
    p.unlink()
    os.symlink(p.name, p)


def _fifo(p: Path) -> None:
    p.unlink()
    os.mkfifo(p)


def _dev_zero(p: Path) -> None:
    p.unlink(missing_ok=True)
    os.symlink("/dev/zero", p)


def _folder(p: Path) -> None:
    p.unlink()
    p.mkdir()


def _dangling(p: Path) -> None:
    p.unlink()
    os.symlink("no-such-file", p)


SPECIAL_FILES = {"link loop": _link_loop, "FIFO": _fifo, "link to /dev/zero": _dev_zero, "folder": _folder}
MESSAGES = {
    "link loop": "cannot be examined",
    "FIFO": "not a regular file",
    "link to /dev/zero": "not a regular file",
    "folder": "is a folder",
}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs and symlinks")
@pytest.mark.parametrize("name", ["genai_config.json", "tokenizer.json", "tokenizer_config.json", "model.onnx"])
@pytest.mark.parametrize("kind", sorted(SPECIAL_FILES))
def test_special_files_are_refused_not_skipped(model_dir, tmp_path, name, kind):
    """A link loop, a FIFO (which would block an open), a link to /dev/zero (which never ends) or a
    folder in place of a file is refused, never skipped: a genai folder is not then read as an
    Optimum export, nor a tokenizer silently dropped."""
    d = _copy(model_dir, tmp_path)
    SPECIAL_FILES[kind](d / name)
    with pytest.raises(ModelLoadError, match=MESSAGES[kind]) as info:
        engine.Engine(d, max_length=64)
    assert name in str(info.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs and symlinks")
def test_chat_template_file_that_is_a_device_or_dangling_link(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path)
    _dev_zero(d / "chat_template.jinja")
    with pytest.raises(ModelLoadError, match=r"chat_template\.jinja: is not a regular file"):
        engine.Engine(d, max_length=64)
    _dangling(d / "chat_template.jinja")
    with pytest.raises(ModelLoadError, match="is a link to 'no-such-file', which does not exist"):
        engine.Engine(d, max_length=64)


def test_oversized_config_is_refused_unread(model_dir, tmp_path, monkeypatch):
    d = _copy(model_dir, tmp_path)
    monkeypatch.setattr("engine.config.MAX_CONFIG_BYTES", 100)
    with pytest.raises(ModelLoadError, match=r"genai_config\.json: is .* bytes; a config file larger than 100"):
        load_model_spec(d)


def test_deeply_nested_config(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path)
    (d / "genai_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelLoadError, match=r"genai_config\.json"):
        load_model_spec(d)


def _raise_for(path_part: str, real: Callable) -> Callable:
    def fake(path, *args, **kwargs):
        if str(path).endswith(path_part):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    return fake


def test_unreadable_config(model_dir, tmp_path, monkeypatch):
    """Unreadable by this user (simulated: the tests may run as root, whom chmod does not stop)."""
    d = _copy(model_dir, tmp_path)
    monkeypatch.setattr(os, "open", _raise_for("genai_config.json", os.open))
    with pytest.raises(ModelLoadError, match=r"genai_config\.json: cannot be read .Permission denied"):
        engine.Engine(d, max_length=64)


def test_unreadable_folder(model_dir, tmp_path, monkeypatch):
    d = _copy(model_dir, tmp_path)
    monkeypatch.setattr(os, "listdir", _raise_for("model", os.listdir))
    with pytest.raises(ModelLoadError, match=r"the model folder cannot be read .Permission denied"):
        engine.Engine(d, max_length=64)


def test_unexaminable_entry(model_dir, tmp_path, monkeypatch):
    d = _copy(model_dir, tmp_path)
    monkeypatch.setattr(os, "stat", _raise_for("tokenizer.json", os.stat))
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json: cannot be examined .Permission denied"):
        engine.Engine(d, max_length=64)


def test_home_of_unknown_user():
    with pytest.raises(ModelFileNotFoundError, match="~no_such_user_here/model"):
        engine.Engine("~no_such_user_here/model")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threads": 2**40}, "threads must be an int in 1..1024"),
        ({"threads": 2147483648}, "threads must be an int in 1..1024"),
        ({"optimized_model_path": "/no/such/folder/x.onnx"}, "its folder .* does not exist"),
        ({"optimized_model_path": 5}, "optimized_model_path must be a path"),
        ({"graph_optimization": ["all"]}, "graph_optimization must be one of"),
    ],
)
def test_absurd_session_arguments(model_dir, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        engine.Engine(model_dir, max_length=64, **kwargs)
    assert not Path("/no/such/folder").exists()  # nothing was created on the way


def test_cos_sin_cache_shorter_than_config_context(model_dir, tmp_path, canonical):
    """The config claims 4096 positions, the graph's rotary cache holds 256 rows: the engine
    refuses a max_length past the rows at load (ORT would fail hundreds of tokens in) and
    defaults to the rows."""
    d = _copy(model_dir, tmp_path)
    rows = load_model_spec(d).rope_cache_rows
    assert rows == SyntheticSpec(layout="gqa", seed=11).context_length
    _edit_json(d / "genai_config.json", lambda c: c["model"].update(context_length=4096))
    with pytest.raises(InvalidRequestError, match=f"exceeds the {rows} rows of the model's GroupQueryAttention"):
        engine.Engine(d, max_length=rows + 1)
    eng = engine.Engine(d)
    try:
        assert eng.max_length == rows
        assert eng.generate("hello", max_new_tokens=6).token_ids == canonical
    finally:
        eng.close()


def test_template_that_renders_nothing(model_dir, tmp_path, canonical):
    d = _copy(model_dir, tmp_path)
    (d / "chat_template.jinja").write_text("{% if false %}x{% endif %}")
    eng = engine.Engine(d, max_length=64)
    try:
        with pytest.raises(InvalidRequestError, match="the chat template rendered no text"):
            eng.chat([{"role": "user", "content": "hi"}], max_new_tokens=2)
        assert eng.generate("hello", max_new_tokens=6).token_ids == canonical
    finally:
        eng.close()


def test_lone_surrogate_in_chat_content(model_dir, canonical):
    eng = engine.Engine(model_dir, max_length=64)
    try:
        with pytest.raises(InvalidRequestError, match=r"messages\[1\]\['content'\] is not valid Unicode"):
            eng.chat([{"role": "system", "content": "ok"}, {"role": "user", "content": "a\ud800b"}])
        assert eng.generate("hello", max_new_tokens=6).token_ids == canonical
    finally:
        eng.close()


def test_errors_are_the_package_errors():
    """Every failure above is an EngineError (so a service can catch one class)."""
    for cls in (ModelLoadError, ModelFileNotFoundError, InvalidRequestError):
        assert issubclass(cls, EngineError)

"""Chat templates: loading, rendering in the sandbox, message validation."""

from __future__ import annotations

import json

import jinja2
import pytest

from engine.chat import PHI_FALLBACK_TEMPLATE, load_chat_template, render_chat
from engine.errors import InvalidRequestError, ModelFileNotFoundError, ModelLoadError
from engine.tokenizer import load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Say 中文 and 😀\nplease"},
]


def test_fallback_renders_phi4_format():
    text = render_chat(CONVERSATION[:2], None)
    assert text == "<|system|>You are terse.<|end|><|user|>Hi there<|end|><|assistant|>"
    assert render_chat(CONVERSATION[:2], PHI_FALLBACK_TEMPLATE) == text
    done = render_chat(CONVERSATION[:3], None, add_generation_prompt=False, eos_token="<|endoftext|>")
    assert done == "<|system|>You are terse.<|end|><|user|>Hi there<|end|><|assistant|>Hello.<|end|><|endoftext|>"


def test_phi3_template_renders_as_jinja_renders_it(phi3_tokenizer_dir):
    template = load_chat_template(phi3_tokenizer_dir)
    assert template == (phi3_tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8")
    for messages in (CONVERSATION, CONVERSATION[1:2], CONVERSATION[:3]):
        for gen in (True, False):
            direct = jinja2.Template(template).render(messages=messages, add_generation_prompt=gen)
            assert render_chat(messages, template, add_generation_prompt=gen) == direct
    text = render_chat(CONVERSATION[:2], template)
    assert text == "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n"


def test_phi_format_special_tokens_encode_to_single_ids(phi3_tokenizer_dir):
    tok = load_tokenizer(phi3_tokenizer_dir)
    for template in (None, load_chat_template(phi3_tokenizer_dir)):
        ids = tok.encode(render_chat(CONVERSATION, template), add_special_tokens=False)
        assert ids.count(32006) == 1  # <|system|>
        assert ids.count(32010) == 2  # <|user|>
        assert ids.count(32001) == 2  # <|assistant|>: one turn plus the generation prompt
        assert ids.count(32007) == len(CONVERSATION)  # <|end|>
        assert tok.decode(ids, skip_special_tokens=False).count("<|end|>") == len(CONVERSATION)


def test_tiny_llama_template_from_tokenizer_config(tiny_llama_fp16):
    template = load_chat_template(tiny_llama_fp16)
    assert template is not None and "raise_exception" in template
    text = render_chat(CONVERSATION[:3], template, bos_token="<s>", eos_token="</s>")
    assert text == "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello. </s>"
    tok = load_tokenizer(tiny_llama_fp16)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and ids[-1] == 2 and ids.count(tok.bos_token_id) == 1


def test_template_raise_exception_is_a_clear_request_error(tiny_llama_fp16):
    template = load_chat_template(tiny_llama_fp16)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(InvalidRequestError, match="rejected the conversation: Conversation roles must alternate"):
        render_chat(bad, template)


def test_load_chat_template_sources(tmp_path):
    with pytest.raises(ModelFileNotFoundError):
        load_chat_template(tmp_path / "missing")
    assert load_chat_template(tmp_path) is None
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"bos_token": "<s>"}), encoding="utf-8")
    assert load_chat_template(tmp_path) is None
    config.write_text(json.dumps({"chat_template": "plain {{ messages }}"}), encoding="utf-8")
    assert load_chat_template(tmp_path) == "plain {{ messages }}"
    listed = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "dflt"}]
    config.write_text(json.dumps({"chat_template": listed}), encoding="utf-8")
    assert load_chat_template(tmp_path) == "dflt"
    config.write_text(json.dumps({"chat_template": listed[:1]}), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="default"):
        load_chat_template(tmp_path)
    config.write_text(json.dumps({"chat_template": 3}), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="chat_template"):
        load_chat_template(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("from the file", encoding="utf-8")
    assert load_chat_template(tmp_path) == "from the file"  # the .jinja file wins
    (tmp_path / "chat_template.jinja").unlink()
    config.write_text("{broken", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_chat_template(tmp_path)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "list of"),
        ({"role": "user", "content": "x"}, "list of"),
        ([], "empty"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"role": "robot", "content": "x"}], "role"),
        ([{"content": "x"}], "role"),
        ([{"role": "user", "content": 3}], "content"),
        ([{"role": "user"}], "content"),
        ([{"role": "user", "content": "x", "name": "bob"}], "unsupported keys"),
    ],
)
def test_messages_are_validated(messages, match):
    with pytest.raises(InvalidRequestError, match=match):
        render_chat(messages, None)


def test_sandbox_and_template_errors():
    msgs = CONVERSATION[1:2]
    with pytest.raises(ModelLoadError, match="sandbox"):
        render_chat(msgs, "{% set x = [] %}{{ x.append(1) }}")
    with pytest.raises(ModelLoadError, match="not valid jinja"):
        render_chat(msgs, "{% for m in messages %}")
    with pytest.raises(InvalidRequestError, match="failed on this conversation"):
        render_chat(msgs, "{{ 1 / 0 }}")
    assert render_chat(msgs, "[{{ ''.__class__ }}]") == "[]"  # unsafe attributes read as undefined


def test_template_extras_and_helpers():
    msgs = CONVERSATION[1:2]
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}"
        "{{ date_string }}{% if add_generation_prompt %}>{% endif %}{{ eos_token }}"
    )
    text = render_chat(msgs, template, bos_token="B", eos_token="E", date_string="26 Nov")
    assert text == 'B{"role": "user", "content": "Hi there"}26 Nov>E'
    assert render_chat([{"role": "user", "content": "<é>"}], "{{ messages[0].content | tojson }}") == '"<é>"'
    assert len(render_chat(msgs, "{{ strftime_now('%Y') }}")) == 4
    # trim_blocks / lstrip_blocks as in transformers: block lines leave no blank lines behind.
    multiline = "{% for m in messages %}\n  {% if m.role == 'user' %}\n{{ m.content }}\n  {% endif %}\n{% endfor %}"
    assert render_chat(msgs, multiline) == "Hi there\n"

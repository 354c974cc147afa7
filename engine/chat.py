"""Chat templates: find a model's template and render a conversation with it.

Templates come with downloaded models, so they are untrusted: they render in a subclass of jinja2's
``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks`` on (what
``transformers`` uses, so a template renders here as it does there). Besides ``messages``,
``add_generation_prompt``, ``bos_token`` and ``eos_token``, a template can call
``raise_exception(message)`` (a clean :class:`~engine.errors.InvalidRequestError`) and
``strftime_now(format)``, and use ``tojson`` without HTML escaping.

The sandbox (:mod:`engine.template_sandbox`, where the limits are) keeps a render bounded in time and
memory: every loop, call, filter and intercepted operator checks a deadline; ``range``, string and
list repetition, ``~``/``+`` concatenation, ``join``/``replace``/``format``/``center``-like growth,
integer powers and the output are refused *before* they would exceed their caps; and everything a
render builds counts against a total. Any failure of the template (a limit, jinja's own errors,
RecursionError, MemoryError, an exception from a method it calls) becomes an
:class:`~engine.errors.InvalidRequestError` that says what happened; a template that does not
compile is a :class:`~engine.errors.ModelLoadError`.

The rendered text is tokenized with ``add_special_tokens=False``: a template that wants BOS writes
``bos_token`` itself, and special-token strings such as ``<|user|>`` encode to their single ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2.sandbox import SecurityError

from .config import entry_kind, read_json_object, read_text
from .errors import InvalidRequestError, ModelFileNotFoundError, ModelLoadError

# the sandbox; some names only re-exported, for tests that reach them through engine.chat
from .template_sandbox import (  # noqa: F401
    MAX_BUILT_CHARS,
    MAX_CALL_DEPTH,
    MAX_INT_BITS,
    MAX_ITEMS,
    MAX_JSON_INDENT,
    MAX_TEMPLATE_CHARS,
    MAX_TEXT_CHARS,
    RENDER_TIMEOUT_S,
    _active,
    _Budget,
    _budget,
    _compile,
    _LimitExceeded,
    _shorten,
    _TemplateRaised,
    _tojson,
)

__all__ = [
    "MAX_TEMPLATE_CHARS",
    "MAX_TEXT_CHARS",
    "PHI_FALLBACK_TEMPLATE",
    "RENDER_TIMEOUT_S",
    "load_chat_template",
    "render_chat",
]

#: The Phi-4-mini chat format, used when a model folder ships no template:
#: ``<|system|>…<|end|><|user|>…<|end|><|assistant|>``, no newlines; without a generation prompt the
#: text ends with ``eos_token`` instead of ``<|assistant|>``.
PHI_FALLBACK_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' ~ message['role'] ~ '|>' ~ message['content'] ~ '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- else -%}{{- eos_token -}}{%- endif -%}"
)
_ROLES = ("system", "user", "assistant")
_TEMPLATE_FILE = "chat_template.jinja"
MAX_TEMPLATE_BYTES = 4 * MAX_TEMPLATE_CHARS  # a template file past this is refused unread (UTF-8: <= 4 bytes a char)


def load_chat_template(model_dir: str | Path) -> str | None:
    """The chat template of a model folder, or None if it has none.

    ``chat_template.jinja`` wins (newer ``transformers`` saves the template there, and it overrides
    the config); else ``tokenizer_config.json``'s ``chat_template``: a string, or a list of
    ``{"name", "template"}`` of which the one named ``default`` is taken. The template is compiled
    here, so a broken one is refused when the model loads.

    Raises:
        ModelFileNotFoundError: the folder does not exist.
        ModelLoadError: a file is unreadable, ``chat_template`` has an unexpected form (a list
            without a ``default`` entry included), or the template does not compile (the message
            names the file).
    """
    folder = Path(model_dir)
    if entry_kind(folder) != "dir":
        raise ModelFileNotFoundError(f"model folder {folder} does not exist")
    path = folder / _TEMPLATE_FILE
    if entry_kind(path) is not None:  # a FIFO, a device or a link loop there is refused, not skipped
        return _compiled_or_refused(read_text(path, MAX_TEMPLATE_BYTES, "chat template"), path)
    config_path = folder / "tokenizer_config.json"
    if entry_kind(config_path) is None:
        return None
    template = read_json_object(config_path, "tokenizer config").get("chat_template")
    if template is None:
        return None
    if isinstance(template, str):
        return _compiled_or_refused(template, config_path)
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return _compiled_or_refused(named["default"], config_path)
        raise ModelLoadError(
            f"{config_path}: chat_template lists templates {sorted(map(str, named))} but none named 'default'"
        )
    raise ModelLoadError(
        f"{config_path}: chat_template must be a string or a list of {{name, template}}, "
        f"found {type(template).__name__}"
    )


def _compiled_or_refused(template: str, origin: Path) -> str:
    """``template``, once it compiles; else ModelLoadError naming ``origin``."""
    try:
        _compile(template)
    except ModelLoadError as e:
        raise ModelLoadError(f"{origin}: {e}") from e
    return template


def _check_messages(messages: object) -> list[dict[str, str]]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InvalidRequestError(
            f'messages must be a list of {{"role": ..., "content": ...}} dicts, got {type(messages).__name__}'
        )
    if not messages:
        raise InvalidRequestError("messages is empty: give at least one message")
    checked = []
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequestError(f"messages[{k}] must be a dict with role and content, got {type(m).__name__}")
        unknown = set(m) - {"role", "content"}
        if unknown:
            raise InvalidRequestError(
                f"messages[{k}] has unsupported keys {sorted(map(str, unknown))}: only 'role' and 'content'"
            )
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise InvalidRequestError(f"messages[{k}]['role'] must be one of {', '.join(_ROLES)}; got {role!r}")
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{k}]['content'] must be a str, got {type(content).__name__}")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequestError(
                f"messages[{k}]['content'] is not valid Unicode text ({e.reason} at index {e.start}); "
                "lone surrogates cannot be tokenized"
            ) from None
        checked.append({"role": role, "content": content})
    return checked


def render_chat(
    messages: Sequence[Mapping[str, str]],
    template: str | None,
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Render a conversation with a chat template (None: :data:`PHI_FALLBACK_TEMPLATE`).

    Args:
        messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``.
        template: jinja source, e.g. from :func:`load_chat_template`.
        add_generation_prompt: end with the assistant's turn header, so the model answers.
        bos_token, eos_token: the strings a template may write for BOS and EOS.
        extra: more variables for the template (``date_string``, ``tools``...).

    Raises:
        InvalidRequestError: malformed messages; the template refused the conversation
            (``raise_exception``), failed on it, went past a limit of the sandbox (time, size,
            nesting: the message names it), or rendered no text.
        ModelLoadError: the template is not valid jinja or tries something the sandbox forbids.
    """
    checked = _check_messages(messages)
    if template is not None and not isinstance(template, str):
        raise InvalidRequestError(f"template must be a str or None, got {type(template).__name__}")
    compiled = _compile(PHI_FALLBACK_TEMPLATE if template is None else template)
    outer = _budget()
    _active.budget = _Budget(RENDER_TIMEOUT_S, MAX_CALL_DEPTH)
    try:
        text = compiled.render(
            **extra,
            messages=checked,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except _TemplateRaised as e:
        raise InvalidRequestError(f"the chat template rejected the conversation: {_shorten(str(e))}") from None
    except _LimitExceeded as e:
        raise InvalidRequestError(f"the chat template {e}") from None
    except SecurityError as e:
        raise ModelLoadError(f"the chat template tried an operation the sandbox forbids: {_shorten(str(e))}") from e
    except RecursionError as e:
        raise InvalidRequestError("the chat template nests too deeply (it hit Python's recursion limit)") from e
    except MemoryError as e:
        raise InvalidRequestError("the chat template ran out of memory while rendering") from e
    except Exception as e:  # untrusted code: whatever it raises (TypeError, ValueError...) is its failure
        raise InvalidRequestError(
            f"the chat template failed on this conversation: {type(e).__name__}: {_shorten(str(e))}"
        ) from e
    finally:
        _active.budget = outer
    if not text:
        raise InvalidRequestError("the chat template rendered no text")
    return text

"""Chat templates: find a model's template and render a conversation with it.

Templates come with downloaded models, so they are untrusted: they render in jinja2's
``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks`` on (what
``transformers`` uses, so a template renders here as it does there). Besides ``messages``,
``add_generation_prompt``, ``bos_token`` and ``eos_token``, a template can call
``raise_exception(message)`` (a clean :class:`~engine.errors.InvalidRequestError`) and
``strftime_now(format)``, and use ``tojson`` without HTML escaping.

The rendered text is tokenized with ``add_special_tokens=False``: a template that wants BOS writes
``bos_token`` itself, and special-token strings such as ``<|user|>`` encode to their single ids.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .errors import InvalidRequestError, ModelFileNotFoundError, ModelLoadError

__all__ = ["PHI_FALLBACK_TEMPLATE", "load_chat_template", "render_chat"]

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


class _TemplateRaised(Exception):
    """What ``raise_exception`` throws inside a template; becomes InvalidRequestError."""


def load_chat_template(model_dir: str | Path) -> str | None:
    """The chat template of a model folder, or None if it has none.

    ``chat_template.jinja`` wins (newer ``transformers`` saves the template there, and it overrides
    the config); else ``tokenizer_config.json``'s ``chat_template``: a string, or a list of
    ``{"name", "template"}`` of which the one named ``default`` is taken.

    Raises:
        ModelFileNotFoundError: the folder does not exist.
        ModelLoadError: a file is unreadable, or ``chat_template`` has an unexpected form (a list
            without a ``default`` entry included).
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ModelFileNotFoundError(f"model folder {folder} does not exist")
    path = folder / _TEMPLATE_FILE
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"cannot read chat template {path}: {e}") from e
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"{config_path} is not valid JSON: {e}") from e
    template = config.get("chat_template") if isinstance(config, dict) else None
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ModelLoadError(
            f"{config_path}: chat_template lists templates {sorted(map(str, named))} but none named 'default'"
        )
    raise ModelLoadError(
        f"{config_path}: chat_template must be a string or a list of {{name, template}}, "
        f"found {type(template).__name__}"
    )


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ModelLoadError(f"the chat template is not valid jinja (line {e.lineno}): {e.message}") from e


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
        InvalidRequestError: malformed messages, or the template refused the conversation
            (``raise_exception``) or failed on it.
        ModelLoadError: the template is not valid jinja or tries something the sandbox forbids.
    """
    checked = _check_messages(messages)
    if template is not None and not isinstance(template, str):
        raise InvalidRequestError(f"template must be a str or None, got {type(template).__name__}")
    compiled = _compile(PHI_FALLBACK_TEMPLATE if template is None else template)
    try:
        return compiled.render(
            **extra,
            messages=checked,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except _TemplateRaised as e:
        raise InvalidRequestError(f"the chat template rejected the conversation: {e}") from None
    except SecurityError as e:
        raise ModelLoadError(f"the chat template tried an operation the sandbox forbids: {e}") from e
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as e:
        raise InvalidRequestError(f"the chat template failed on this conversation: {type(e).__name__}: {e}") from e

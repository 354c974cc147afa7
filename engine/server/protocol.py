"""The OpenAI wire format: request models (strict), error bodies, and the response pieces.

Requests are pydantic models with ``extra="forbid"`` and strict types, so a misspelt or unsupported
field, or a value of the wrong JSON type, is a 400 with an OpenAI-shaped body
``{"error": {"message", "type", "param", "code"}}`` instead of being ignored or coerced. Value
ranges (temperature, top_p, penalties, seed, logit_bias, logprobs...) are checked once, by the
engine (engine/request.py, engine/sampling.py): the server passes them through and turns the
engine's :class:`~engine.errors.InvalidRequestError` into the same 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ContextLengthError, EngineError

MAX_N = 16  # choices per request (each takes a batch row)


class APIError(Exception):
    """An error answered with an OpenAI-shaped body (and optional headers, e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """``{"error": {...}}`` as OpenAI writes it."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_engine_error(e: EngineError) -> APIError:
    """The engine's refusal of a request as a 400 (its message says what is wrong and what is allowed)."""
    code = "context_length_exceeded" if isinstance(e, ContextLengthError) else None
    return APIError(400, str(e), code=code)


def from_validation_error(e: ValidationError) -> APIError:
    """A pydantic error as a 400 naming the first bad field (``messages.0.role``)."""
    err = e.errors(include_url=False)[0]
    parts = [str(p) for p in err.get("loc", ())]
    # a union's branch tags ("str", "list[int]") are not fields: the field is what comes before
    fields = [p for p in parts if not (p in _TYPE_TAGS or "[" in p)]
    loc = ".".join(fields)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        msg = f"unknown or unsupported field {loc!r}"
    elif len(fields) < len(parts) and fields and fields[-1] in _UNION_HELP:
        msg = f"{loc}: must be {_UNION_HELP[fields[-1]]}"
    else:
        msg = f"{loc}: {err.get('msg', 'invalid value')}" if loc else str(err.get("msg", "invalid request"))
    return APIError(400, msg, param=loc or None)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict"})
_UNION_HELP = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids",
    "content": "a string, a list of text parts ({'type': 'text', 'text': ...}), or null",
    "stop": "a string or a list of strings",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Request(_Strict):
    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """A top-level ``null`` means "not given" (clients send ``"logprobs": null``, ``"n": null``)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _Sampling(_Request):
    """Fields shared by both endpoints (vLLM's extensions top_k, min_p, repetition_penalty included)."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # -1 or 0: off
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def sampling(self) -> dict[str, Any]:
        """Keyword arguments of ``Engine.submit`` (ranges are checked by the engine).

        OpenAI semantics: temperature defaults to 1 (sampling); 0 is greedy."""
        t = 1.0 if self.temperature is None else self.temperature
        kw: dict[str, Any] = {"do_sample": t > 0, "temperature": t}  # a negative one: the engine's 400
        for name in ("top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "seed"):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        if self.top_k is not None:
            kw["top_k"] = 0 if self.top_k == -1 else self.top_k
        if self.logit_bias:
            bias: dict[int, float] = {}
            for key, value in self.logit_bias.items():
                try:
                    bias[int(key)] = value
                except ValueError:
                    raise APIError(
                        400, f"logit_bias keys must be token ids (integers as strings), got {key!r}", param="logit_bias"
                    ) from None
            kw["logit_bias"] = bias
        return kw

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_n(self) -> int | None:
        """The engine's ``logprobs`` (top-n alternatives), None when off."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` a string, a list of strings, a list of token ids, or a
    list of lists of token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: Literal[False] = False
    suffix: None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one entry per prompt."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt is an empty list; give text or token ids", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def check(self) -> None:
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of")


def finish_reason(engine_reason: str) -> str:
    """The engine's finish reason in OpenAI's words: eos and stop strings are ``stop``."""
    return "length" if engine_reason == "length" else "stop"

"""The bounded jinja sandbox that chat templates render in (see :mod:`engine.chat`).

Chat templates come with downloaded models, so they are untrusted code. jinja2's
``ImmutableSandboxedEnvironment`` keeps them from touching Python objects, but not from looping,
recursing or building strings without end; this module bounds one render in time, output size, total
characters built, call depth and integer size, refusing growth *before* it happens, so that a hostile
template costs at most about a second and a few hundred megabytes instead of hanging or exhausting the
process. Limits raise :class:`_LimitExceeded` and ``raise_exception`` raises :class:`_TemplateRaised`;
:func:`engine.chat.render_chat` turns them into clean errors.
"""

from __future__ import annotations

import json
import re
import string
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes, pass_context
from jinja2.ext import loopcontrols
from jinja2.runtime import LoopContext, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from .errors import ModelLoadError

# Limits of one render. Real templates render in about a millisecond and build a few times the
# length of the conversation, so each limit sits orders of magnitude above what they use.

#: Seconds one render may take.
RENDER_TIMEOUT_S = 1.0
#: Characters of the rendered prompt, and of any one string, list or dict a template builds: about a
#: million tokens, more than the context of any model the engine runs.
MAX_TEXT_CHARS = 4_000_000
#: Characters (items, for lists) one render may build in all, garbage included: 8 prompts' worth,
#: so that a template cannot hold many capped strings at once.
MAX_BUILT_CHARS = 8 * MAX_TEXT_CHARS
#: Numbers in a ``range()``, and items given to a filter that runs Python code per item (sort,
#: unique, groupby, map, select...), where no deadline check reaches: jinja's own MAX_RANGE.
MAX_ITEMS = 100_000
#: Nested calls (macros, ``caller()``, recursive loops): a recursive macro stops here, well before
#: Python's recursion limit.
MAX_CALL_DEPTH = 64
#: Bits of an integer a template computes (``10**1200`` fits): ``**`` and ``*`` would otherwise grow
#: numbers, and the time to print them, without end.
MAX_INT_BITS = 4096
#: ``tojson(indent=...)`` width.
MAX_JSON_INDENT = 64
#: Characters of a template's source: five times the largest published chat templates (~20 k).
#: Compiling costs up to ~20 µs a character (a page of ``~`` expressions), so at most ~2 s.
MAX_TEMPLATE_CHARS = 100_000

_LOOP_GUARD = "(loop guard)"  # filter names a template cannot write: only the compiler below adds them
_CONCAT_GUARD = "(concat guard)"


class _TemplateRaised(Exception):
    """What ``raise_exception`` throws inside a template; becomes InvalidRequestError."""


class _LimitExceeded(Exception):
    """A render went past one of the limits above; becomes InvalidRequestError."""


# ---- the budget of the render running on this thread ----


class _Budget:
    """Deadline, characters built and call depth (and its limit) of one render."""

    __slots__ = ("built", "deadline", "depth", "max_depth", "seconds")

    def __init__(self, seconds: float, max_depth: int = MAX_CALL_DEPTH) -> None:
        self.seconds = seconds
        self.max_depth = max_depth
        self.deadline = time.monotonic() + seconds
        self.built = 0
        self.depth = 0


_active = threading.local()  # .budget: the _Budget of the render running on this thread, if any


def _budget() -> _Budget | None:
    """The running render's budget; None outside a render (jinja folding constants at compile time)."""
    return getattr(_active, "budget", None)


def _tick(budget: _Budget | None) -> None:
    if budget is not None and time.monotonic() > budget.deadline:
        raise _LimitExceeded(f"took more than {budget.seconds:g} s to render (limit {budget.seconds:g} s)")


def _count_built(n: int) -> None:
    budget = _budget()
    if budget is not None:
        budget.built += n
        if budget.built > MAX_BUILT_CHARS:
            raise _LimitExceeded(f"built more than {MAX_BUILT_CHARS:,} characters in all (limit {MAX_BUILT_CHARS:,})")


def _number(n: int) -> str:
    return f"{n:,}" if n < 10**15 else f"{n:.1e}"


def _check_estimate(estimate: int, what: str) -> None:
    """Refuse an operation before it runs when its result would pass MAX_TEXT_CHARS."""
    if estimate > MAX_TEXT_CHARS:
        raise _LimitExceeded(
            f"used {what}, which would make about {_number(estimate)} characters (limit {MAX_TEXT_CHARS:,})"
        )


def _checked(value: Any, what: str) -> Any:
    """``value`` (a result of ``what``), once it is within the size limits; counts it as built."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise _LimitExceeded(f"used {what} to make an integer of {value.bit_length():,} bits (limit {MAX_INT_BITS:,})")
    if _size(value) > MAX_TEXT_CHARS:
        raise _LimitExceeded(f"used {what} to make a value of more than {MAX_TEXT_CHARS:,} characters (the limit)")
    if isinstance(value, (str, bytes, list, tuple, dict)):
        _count_built(len(value))
    return value


# ---- sizes and estimates ----


def _children(value: Any) -> Sequence[Any] | None:
    if isinstance(value, (list, tuple, set, frozenset)):
        return value  # type: ignore[return-value]
    if isinstance(value, Namespace):
        value = value._Namespace__attrs  # its repr shows them; the one attribute a Namespace lets through
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    return None


def _scalar_size(value: Any) -> int | None:
    """Characters of ``str(value)`` for a str, bytes or number (about); None for anything else."""
    if isinstance(value, (str, bytes, bytearray)):
        return len(value)
    if value is None or isinstance(value, (bool, float)):
        return 24
    if isinstance(value, int):
        return value.bit_length() * 31 // 100 + 2
    return None


def _size(value: Any, limit: int = MAX_TEXT_CHARS, indent: int = 0) -> int:
    """About how many characters ``str(value)`` takes (``indent``: per nesting level and item, as
    ``json.dumps(indent=...)`` adds). Stops counting past ``limit``, so it costs O(limit) at most."""
    total = 0
    stack = [(value, 0)]
    while stack and total <= limit:
        v, depth = stack.pop()
        children = _children(v)
        if children is None:
            n = _scalar_size(v)
            total += (64 if n is None else n) + (indent * depth + 1 if indent else 0)
            continue
        total += 2 * len(children) + 2 + (indent * depth + 1 if indent else 0)
        pad = indent * (depth + 1) + 1 if indent else 0
        for c in children:
            n = _scalar_size(c)
            if n is None:
                stack.append((c, depth + 1))
            else:
                total += n + pad
                if total > limit:
                    break
    return total


_FORMATTER = string.Formatter()
_DIGITS = re.compile(r"\d+")
_FIELD_KEY = re.compile(r"[^.\[]*")
_PERCENT_SPEC = re.compile(r"%(?:\(([^)]*)\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.DOTALL)


def _spec_number(digits: str) -> int:
    return int(digits) if len(digits) <= 15 else 10**15


def _positive_int(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def _format_estimate(fmt: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    """Upper bound of ``len(fmt.format(*args, **kwargs))``: literal text, each field's value, each
    width or precision (a nested ``{}`` width may be any integer argument)."""
    total, auto = 0, 0
    any_int = sum(_positive_int(v) for v in (*args, *kwargs.values()))
    for literal, field, spec, conversion in _FORMATTER.parse(fmt):
        total += len(literal)
        if field is None:
            continue
        key = _FIELD_KEY.match(field).group()  # type: ignore[union-attr]
        if not key:
            value, auto = (args[auto] if auto < len(args) else None), auto + 1
        elif key.isdigit():
            value = args[int(key)] if len(key) < 6 and int(key) < len(args) else None
        else:
            value = kwargs.get(key)
        total += _size(value) * (10 if conversion in ("r", "a") else 1)
        if spec:
            total += sum(_spec_number(d) for d in _DIGITS.findall(spec)) + (any_int if "{" in spec else 0)
    return total


def _percent_estimate(fmt: str, values: Any) -> int:
    """Upper bound of ``len(fmt % values)``."""
    args = values if isinstance(values, tuple) else (values,)
    mapping = values if isinstance(values, Mapping) else None
    total, i = len(fmt), 0
    for key, width, precision, conversion in _PERCENT_SPEC.findall(fmt):
        if conversion == "%":
            continue
        for part in (width, precision):
            if part == "*":
                total += _positive_int(args[i]) if i < len(args) else 0
                i += 1
            elif part:
                total += _spec_number(part)
        if key and mapping is not None:
            value = mapping.get(key)
        else:
            value, i = (args[i] if i < len(args) else None), i + 1
        total += _size(value) * (10 if conversion in ("r", "a") else 1)
    return total


def _check_binop(operator: str, left: Any, right: Any) -> None:
    what = f"the {operator!r} operator"
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(times, int):
                _check_estimate(_size(seq) * max(times, 0), what)
        if isinstance(left, int) and isinstance(right, int):
            bits = left.bit_length() + right.bit_length()
            if bits > MAX_INT_BITS:
                raise _LimitExceeded(f"used {what} to make an integer of about {bits:,} bits (limit {MAX_INT_BITS:,})")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            bits = (abs(left).bit_length() - 1) * right  # the result has at least this many
            if bits > MAX_INT_BITS:
                raise _LimitExceeded(
                    f"used {what} to make an integer of more than {_number(bits)} bits (limit {MAX_INT_BITS:,})"
                )
    elif operator == "+":
        if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
            _check_estimate(_size(left) + _size(right), what)
    elif operator == "%" and isinstance(left, str):
        _check_estimate(_percent_estimate(left, right), what)


def _check_method_call(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Refuse a str/bytes method call whose result would pass MAX_TEXT_CHARS; returns the arguments
    to call it with (``join`` gets its items as a list, having counted them)."""
    owner = getattr(method, "__self__", None)
    if not isinstance(owner, (str, bytes)):
        return args
    name = getattr(method, "__name__", "")
    what = f"{type(owner).__name__}.{name}()"
    if name == "join" and len(args) == 1:
        items = args[0] if isinstance(args[0], Sized) else _materialize(args[0], what)
        _check_estimate(_size(items) + len(owner) * max(len(items) - 1, 0), what)  # type: ignore[arg-type]
        return (items,)
    if name == "replace" and len(args) >= 2 and isinstance(args[0], type(owner)):
        old, new = args[0], args[1]
        hits = len(owner) + 1 if not old else owner.count(old)
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        _check_estimate(len(owner) + hits * _size(new), what)
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        _check_estimate(len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * _positive_int(tab), what)
    elif name == "translate" and args and isinstance(args[0], Mapping):
        widest = max((_size(v) for v in args[0].values()), default=1)
        _check_estimate(len(owner) * max(widest, 1), what)
    elif name in ("format", "format_map") and isinstance(owner, str):  # jinja < 3.1.5 routes these here
        mapping = args[0] if name == "format_map" and args and isinstance(args[0], Mapping) else kwargs
        _check_estimate(_format_estimate(owner, args if name == "format" else (), mapping), what)
    for value in (*args, *kwargs.values()):  # center, ljust, rjust, zfill: a width
        if isinstance(value, int) and value > MAX_TEXT_CHARS:
            raise _LimitExceeded(f"passed {_number(value)} to {what} (limit {MAX_TEXT_CHARS:,})")
    return args


def _materialize(iterable: Iterable[Any], what: str) -> list[Any]:
    """The items of a lazy iterable (a map/select chain), at most MAX_ITEMS of them."""
    budget = _budget()
    items: list[Any] = []
    for item in iterable:
        if len(items) >= MAX_ITEMS:
            raise _LimitExceeded(f"gave more than {MAX_ITEMS:,} items to {what} (the limit)")
        if not len(items) & 0xFF:
            _tick(budget)
        items.append(item)
    return items


# ---- filters: each estimate is an upper bound of the output's length, from the arguments ----


def _est_center(value: Any, width: int = 80) -> int:
    return max(_size(value), _positive_int(width))


def _est_indent(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> int:
    lines = s.count("\n") + 1 if isinstance(s, str) else _size(s)
    return _size(s) + lines * (_positive_int(width) if isinstance(width, int) else _size(width))


def _est_wordwrap(s: Any, width: int = 79, break_long_words: bool = True, wrapstring: Any = None, **_: Any) -> int:
    n = _size(s)
    return n + (n + 1) * (1 if wrapstring is None else _size(wrapstring))


def _est_replace(s: Any, old: Any, new: Any, count: Any = None) -> int:
    n = _size(s)
    hits = n + 1 if not isinstance(s, str) or not isinstance(old, str) or not old else s.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return n + hits * _size(new)


def _est_format(value: Any, *args: Any, **kwargs: Any) -> int:
    return _percent_estimate(value, kwargs or args) if isinstance(value, str) else _size(value)


def _est_join(value: Any, d: Any = "", attribute: Any = None) -> int:
    return _size(value) + _size(d) * max(len(value) - 1, 0)


def _est_batch(value: Any, linecount: int, fill_with: Any = None) -> int:
    return _size(value) + (0 if fill_with is None else _positive_int(linecount) * (_size(fill_with) + 2))


def _est_slice(value: Any, slices: int, fill_with: Any = None) -> int:
    return _size(value) + _positive_int(slices) * (4 + (0 if fill_with is None else _size(fill_with) + 2))


def _est_sum(iterable: Any, attribute: Any = None, start: Any = 0) -> int:
    if isinstance(start, (int, float)):
        return 0
    return (_size(iterable) + _size(start)) * (len(iterable) + 1)  # each step copies the sum so far


def _est_tojson(value: Any, indent: Any = None) -> int:
    width = 0 if indent is None else _positive_int(indent) if isinstance(indent, int) else _size(indent)
    if width > MAX_JSON_INDENT:
        raise _LimitExceeded(f"asked tojson for an indent of {_number(width)} (limit {MAX_JSON_INDENT})")
    return _size(value, indent=width)


def _est_urlize(
    value: Any, trim_url_limit: Any = None, nofollow: Any = False, target: Any = None, rel: Any = None, **_: Any
) -> int:
    n = _size(value)
    return 3 * n + (n // 4 + 1) * (64 + _size(target) + _size(rel))


def _times(factor: int) -> Callable[..., int]:
    return lambda value, *args, **kwargs: factor * _size(value)


def _est_case(value: Any, *args: Any, **kwargs: Any) -> int:
    """upper/lower/title/capitalize: ASCII text keeps its length; other case mappings make up to
    three characters of one ('ß' -> 'SS', 'ﬃ' -> 'FFI')."""
    return len(value) if isinstance(value, str) and value.isascii() else 3 * _size(value)


_ESTIMATES: dict[str, Callable[..., int]] = {
    "center": _est_center,
    "indent": _est_indent,
    "wordwrap": _est_wordwrap,
    "replace": _est_replace,
    "format": _est_format,
    "join": _est_join,
    "batch": _est_batch,
    "slice": _est_slice,
    "sum": _est_sum,
    "tojson": _est_tojson,
    "urlize": _est_urlize,
    "pprint": lambda value, *a, **k: 2 * _size(value, indent=1),
    "e": _times(6),  # '"' -> '&#34;'
    "escape": _times(6),
    "forceescape": _times(6),
    "xmlattr": _times(6),
    "urlencode": _times(12),  # one character -> up to four %XX
    "upper": _est_case,
    "lower": _est_case,
    "title": _est_case,
    "capitalize": _est_case,
}
# filters that run Python code per item, out of reach of the deadline check: at most MAX_ITEMS items
_PER_ITEM = frozenset(
    {"sort", "unique", "dictsort", "groupby", "min", "max", "sum", "map", "select", "reject", "selectattr"}
    | {"rejectattr", "batch", "slice"}
)


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` as a filter that checks the deadline, refuses an output its arguments make too large,
    and checks the output it made. It takes the context (so jinja never runs it at compile time)
    and hands ``func`` whatever ``func`` asks for."""
    pass_arg = getattr(getattr(func, "jinja_pass_arg", None), "name", None)
    estimate = _ESTIMATES.get(name)
    what = f"the {name!r} filter"

    @pass_context
    def guarded(context: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        _tick(_budget())
        if (name in _PER_ITEM or name == "join") and isinstance(value, Iterator):
            value = _materialize(value, what)
        if name in _PER_ITEM and isinstance(value, Sized) and len(value) > MAX_ITEMS:
            raise _LimitExceeded(f"gave {len(value):,} items to {what} (limit {MAX_ITEMS:,})")
        if estimate is not None:
            try:
                n = estimate(value, *args, **kwargs)
            except TypeError:  # arguments the filter itself refuses, with its own message
                n = 0
            _check_estimate(n, what)
        if pass_arg == "context":
            args = (context, value, *args)
        elif pass_arg == "eval_context":
            args = (context.eval_ctx, value, *args)
        elif pass_arg == "environment":
            args = (context.environment, value, *args)
        else:
            args = (value, *args)
        return _checked(func(*args, **kwargs), what)

    return guarded


@pass_context
def _loop_guard(context: Any, iterable: Any) -> Iterator[Any]:
    """What every ``{% for %}`` iterates: the items, with a deadline check every 256."""
    return _guarded_iter(iterable)


def _guarded_iter(iterable: Any) -> Iterator[Any]:
    budget = _budget()
    for n, item in enumerate(iterable):
        if not n & 0xFF:
            _tick(budget)
        yield item


@pass_context
def _concat_guard(context: Any, parts: list[Any]) -> str:
    """What every ``a ~ b ~ c`` computes: the joined text, refused before it passes the cap."""
    _tick(_budget())
    _check_estimate(sum(_size(p) for p in parts), "the '~' operator")
    text = (markup_join if context.eval_ctx.autoescape else str_join)(parts)
    _count_built(len(text))
    return text


def _finalize_output(value: Any) -> Any:
    """Every ``{{ value }}``, before jinja turns it into text."""
    _tick(_budget())
    if _size(value) > MAX_TEXT_CHARS:
        raise _LimitExceeded(f"tried to output a value of more than {MAX_TEXT_CHARS:,} characters (the limit)")
    return value


def _bounded_range(*args: int) -> range:
    numbers = range(*args)
    try:
        n = len(numbers)
    except OverflowError:  # more than sys.maxsize numbers
        n = MAX_ITEMS + 1
    if n > MAX_ITEMS:
        raise _LimitExceeded(f"asked for a range() of {_number(n)} numbers (limit {MAX_ITEMS:,})")
    return numbers


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GuardLoopsAndConcat(NodeTransformer):
    """Rewrites a parsed template: ``{% for x in it %}`` iterates ``it|(loop guard)`` and
    ``a ~ b`` becomes ``[a, b]|(concat guard)``, the two things jinja does without calling the
    environment."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _LOOP_GUARD, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        parts = nodes.List(node.nodes, lineno=node.lineno)
        return nodes.Filter(parts, _CONCAT_GUARD, [], [], None, None, lineno=node.lineno)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, bounded in time and memory (see the module docstring)."""

    intercepted_binops = frozenset(("*", "**", "+", "%"))

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], finalize=_finalize_output)
        del self.globals["lipsum"]  # an unbounded Python loop over its arguments; no chat template uses it
        self.globals.update(range=_bounded_range, raise_exception=_raise_exception, strftime_now=_strftime_now)
        self.filters["tojson"] = _tojson
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        self.filters.update({_LOOP_GUARD: _loop_guard, _CONCAT_GUARD: _concat_guard})

    def concat(self, parts: Iterable[str]) -> str:  # type: ignore[override]
        """The text of the whole render, a macro, a ``caller()`` or a ``{% set %}`` block."""
        budget = _budget()
        chunks, total = [], 0
        for chunk in parts:
            total += len(chunk)
            if total > MAX_TEXT_CHARS:
                raise _LimitExceeded(f"rendered more than {MAX_TEXT_CHARS:,} characters (the limit)")
            chunks.append(chunk)
            _tick(budget)
        _count_built(total)
        return "".join(chunks)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick(_budget())
        _check_binop(operator, left, right)
        return _checked(super().call_binop(context, operator, left, right), f"the {operator!r} operator")

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        _tick(budget)
        if isinstance(obj, LoopContext) and args:  # loop(children) in a recursive for loop
            args = (_guarded_iter(args[0]), *args[1:])
        args = _check_method_call(obj, args, kwargs)
        what = f"{getattr(obj, '__name__', type(obj).__name__)}()"
        if budget is None:
            return _checked(super().call(context, obj, *args, **kwargs), what)
        if budget.depth >= budget.max_depth:
            raise _LimitExceeded(
                f"nested calls more than {budget.max_depth} deep (limit {budget.max_depth}; a recursive macro?)"
            )
        budget.depth += 1
        try:
            return _checked(super().call(context, obj, *args, **kwargs), what)
        finally:
            budget.depth -= 1

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """``str.format`` / ``format_map`` (jinja >= 3.1.5 sandboxes them here), refused before they
        would make more than MAX_TEXT_CHARS."""
        sandboxed = super().wrap_str_format(value)
        if sandboxed is None:
            return None
        fmt, name = value.__self__, value.__name__

        def bounded(*args: Any, **kwargs: Any) -> str:
            if name == "format_map":
                mapping = args[0] if len(args) == 1 and isinstance(args[0], Mapping) else {}
                estimate = _format_estimate(fmt, (), mapping)
            else:
                estimate = _format_estimate(fmt, args, kwargs)
            _check_estimate(estimate, f"str.{name}()")
            return sandboxed(*args, **kwargs)

        return bounded


_SANDBOX = _BoundedSandbox()


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """The template compiled in the bounded sandbox; ModelLoadError if it does not compile."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ModelLoadError(f"the chat template has {len(template):,} characters (limit {MAX_TEMPLATE_CHARS:,})")
    try:
        tree = _GuardLoopsAndConcat().visit(_SANDBOX.parse(template))
        tree.set_environment(_SANDBOX)
        return _SANDBOX.from_string(tree)
    except jinja2.TemplateSyntaxError as e:
        raise ModelLoadError(f"the chat template is not valid jinja (line {e.lineno}): {e.message}") from e
    except RecursionError as e:
        raise ModelLoadError("the chat template nests too deeply to compile (Python's recursion limit)") from e
    except MemoryError as e:
        raise ModelLoadError("the chat template is too large to compile (out of memory)") from e
    except Exception as e:  # untrusted source: whatever compiling it raises (Python's nesting limits...) is its fault
        raise ModelLoadError(f"the chat template does not compile: {type(e).__name__}: {_shorten(str(e))}") from e


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"

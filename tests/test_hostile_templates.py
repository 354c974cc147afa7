"""Untrusted chat templates: each hostile one ends within the render deadline, in bounded memory, with
the package's error naming the limit; legitimate templates render exactly as plain jinja renders them.

Every test runs under an alarm (``within``), so that a template the sandbox fails to bound fails the
test in seconds instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator

import pytest
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine import chat
from engine.chat import MAX_TEMPLATE_CHARS, MAX_TEXT_CHARS, load_chat_template, render_chat
from engine.errors import InvalidRequestError, ModelLoadError
from engine.testing.synthetic import SyntheticSpec, cached_model

MSGS = [{"role": "user", "content": "hi"}]
NESTED_RANGES = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


class _Hung(BaseException):
    """Raised by the alarm: a BaseException, so that no ``except Exception`` under test swallows it."""


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail (raise _Hung) if the block runs longer than ``seconds``."""

    def alarm(signum: int, frame: object) -> None:
        raise _Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def short_deadline(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(chat, "RENDER_TIMEOUT_S", 0.25)
    return 0.25


def _refused(template: str, match: str, error: type[Exception] = InvalidRequestError, **extra: object) -> None:
    with within(6), pytest.raises(error, match=match):
        render_chat(MSGS, template, **extra)


# ---- time ----


@pytest.mark.parametrize(
    "template",
    [
        NESTED_RANGES,
        "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",  # strings, no range
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ j if loop.last }}{% endfor %}{% endfor %}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% set x = i * j %}{% endfor %}{% endfor %}",
        "{% macro m() %}" + NESTED_RANGES + "{% endmacro %}{{ m() }}",
        "{% set s %}" + NESTED_RANGES + "{% endset %}{{ s }}",
        "{% for m in range(100000) recursive %}{% if m is number %}{{ loop(range(100000)|map('string')) }}"
        "{% endif %}{% endfor %}",
        "{{ range(100000)|map('string')|map('string')|join|length }}"
        "{% for i in range(100000) %}{{ range(100000)|map('string')|join|length }}{% endfor %}",
    ],
)
def test_long_renders_stop_at_the_deadline(template, short_deadline):
    start = time.monotonic()
    _refused(template, r"took more than 0\.25 s to render \(limit 0\.25 s\)")
    assert time.monotonic() - start < 2


@pytest.mark.slow
def test_the_default_deadline_is_one_second():
    start = time.monotonic()
    _refused(NESTED_RANGES, r"took more than 1 s to render")
    assert 0.9 < time.monotonic() - start < 4


# ---- size ----

S1M = "{% set s = 'x' * 1000000 %}"  # a 1 M-character string, allowed


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{{ 'x' * 10**8 }}", r"'\*' operator, which would make about 100,000,000 characters \(limit 4,000,000\)"),
        ("{{ 'x' * 10**11 }}", r"'\*' operator, which would make about 100,000,000,000 characters"),
        ("{{ 10**11 * 'x' }}", r"'\*' operator"),
        ("{{ ['x'] * 10**9 }}", r"'\*' operator"),
        ("{{ ('x' * 3000000) + ('x' * 3000000) }}", r"'\+' operator"),
        ("{{ '%0999999999d' % 1 }}", r"'%' operator"),
        ("{{ '%(a)s%(a)s' % {'a': 'x' * 3000000} }}", r"'%' operator"),
        (
            "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
            r"'~' operator",
        ),
        ("{{ 'x'|center(10**9) }}", r"'center' filter, which would make about 1,000,000,000 characters"),
        ("{{ 'x'.center(10**9) }}", r"passed 1,000,000,000 to str.center\(\) \(limit 4,000,000\)"),
        ("{{ 'x'.zfill(10**9) }}", r"str.zfill\(\)"),
        ("{{ '%0999999999d'|format(1) }}", r"'format' filter"),
        ("{{ '{:>999999999}'.format(1) }}", r"str.format\(\)"),
        ("{{ '{0}{0}'.format('x' * 3000000) }}", r"str.format\(\)"),
        ("{{ '{a:{w}}'.format_map({'a': 1, 'w': 10**9}) }}", r"str.format_map\(\)"),
        (S1M + "{{ s.replace('x', 'yyyyy') }}", r"str.replace\(\)"),
        (S1M + "{{ s|replace('x', 'yyyyy') }}", r"'replace' filter"),
        ("{{ ('\t' * 1000).expandtabs(100000) }}", r"str.expandtabs\(\)"),
        (S1M + "{{ s.join(['a'] * 1000) }}", r"str.join\(\)"),
        (S1M + "{{ [s, s, s, s, s]|join }}", r"'join' filter"),
        (S1M + "{{ [s, s, s, s, s] }}", r"output a value of more than 4,000,000 characters"),
        (S1M + "{% for i in range(5) %}{{ s }}{% endfor %}", r"rendered more than 4,000,000 characters"),
        (
            "{% macro m() %}{{ caller() }}{{ caller() }}{% endmacro %}{% call m() %}{{ 'x' * 3000000 }}{% endcall %}",
            r"rendered more than 4,000,000 characters",
        ),
        ("{{ ('a\n' * 1000000)|indent(10) }}", r"'indent' filter"),
        ("{{ ('ab ' * 1000)|wordwrap(1, wrapstring='y' * 10000) }}", r"'wordwrap' filter"),
        ("{{ ('ß' * 2000000)|upper }}", r"'upper' filter, which would make about 6,000,000 characters"),
        ("{{ [1]|batch(10**9, 'x')|list }}", r"'batch' filter"),
        ("{{ [1]|slice(10**9, 'x')|list }}", r"'slice' filter"),
        ("{{ {'a': 1}|tojson(indent=10**9) }}", r"asked tojson for an indent of 1,000,000,000 \(limit 64\)"),
        ("{{ range(10**9)|list }}", r"asked for a range\(\) of 1,000,000,000 numbers \(limit 100,000\)"),
        ("{{ range(10**30) }}", r"range\(\) of .* numbers \(limit 100,000\)"),
        ("{{ 2 ** 100000 }}", r"'\*\*' operator to make an integer of more than 100,000 bits \(limit 4,096\)"),
        ("{{ 10**1000 * 10**1000 * 10**1000 * 10**1000 * 10**1000 }}", r"integer of about .* bits"),
        ("{{ range(100000)|map('center', 1000000)|list|length }}", r"built more than 32,000,000 characters in all"),
        (
            "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}"
            "{% set ns.l = [ns.l, 'x' * 1000000 ~ i] %}{% endfor %}",
            r"built more than 32,000,000 characters in all",
        ),
        ("{{ {}.fromkeys(range(100000), 'x' * 100) }}", r"fromkeys\(\) to make a value of more than 4,000,000"),
        (S1M + "{% set ns = namespace(a=s, b=s, c=s, d=s, e=s) %}{{ ns }}", r"more than 4,000,000 characters"),
    ],
)
def test_oversized_values_are_refused_before_they_are_built(template, match):
    tracemalloc.start()
    try:
        _refused(template, match)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    "template",
    [
        "{{ (range(60000)|list + range(60000)|list)|sort }}",
        "{{ (range(60000)|list + range(60000)|list)|unique|list }}",
        "{{ (range(60000)|list + range(60000)|list)|map('string')|list }}",
        "{{ (range(60000)|list + range(60000)|list)|groupby('real') }}",
        "{{ ('x' * 120000)|sort }}",
    ],
)
def test_filters_that_run_python_per_item_take_at_most_100k_items(template):
    _refused(template, r"gave 120,000 items to the '\w+' filter \(limit 100,000\)")


def test_values_under_the_caps_render():
    assert render_chat(MSGS, "{{ ('x' * 3000000)|length }}") == "3000000"
    assert len(render_chat(MSGS, "{{ 'ab'|replace('', 'x' * 1000000) }}")) == 3_000_002
    assert render_chat(MSGS, "{{ (range(100000)|list)|sort|last }}") == "99999"
    assert render_chat(MSGS, "{{ 2 ** 4000 > 0 }}") == "True"
    assert render_chat(MSGS, "{{ ('ab ' * 1300000)|upper|length }}") == "3900000"  # ASCII: no growth
    text = render_chat(MSGS, "{{ 'y' * (" + str(MAX_TEXT_CHARS) + " - 1) }}")
    assert len(text) == MAX_TEXT_CHARS - 1


# ---- nesting ----


@pytest.mark.parametrize(
    "template",
    [
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{% macro a(n) %}{{ b(n) }}{% endmacro %}{% macro b(n) %}{{ a(n) }}{% endmacro %}{{ a(1) }}",
        "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
        "{% block a %}{{ self.a() }}{% endblock %}",
    ],
)
def test_recursion_stops_at_the_call_depth_limit(template):
    _refused(template, r"nested calls more than 64 deep \(limit 64; a recursive macro\?\)")


def test_python_recursion_limit_is_a_clean_error(monkeypatch):
    monkeypatch.setattr(chat, "MAX_CALL_DEPTH", 10**9)
    _refused("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", r"hit Python's recursion limit")
    deep = "{% set ns = namespace(l=1) %}{% for i in range(20000) %}{% set ns.l = [ns.l] %}{% endfor %}"
    _refused(deep + "{{ ns.l|tojson }}", r"recursion limit|more than")
    _refused(deep + "{{ ns.l }}", r"recursion limit|more than")


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{% if true %}" * 300 + "x" + "{% endif %}" * 300, r"nests too deeply to compile"),
        ("{{ " + "(" * 500 + "1" + ")" * 500 + " }}", r"nests too deeply to compile"),
        ("{{ " + "[" * 500 + "]" * 500 + " }}", r"nests too deeply to compile"),
        ("{% for i in range(2) %}" * 25 + "x" + "{% endfor %}" * 25, r"does not compile: SyntaxError"),
        ("{{ " + "9" * 5000 + " }}", r"does not compile: ValueError"),
        ("x" * (MAX_TEMPLATE_CHARS + 1), r"has 100,001 characters \(limit 100,000\)"),
        ("{% for m in messages %}", r"not valid jinja \(line 1\)"),
    ],
)
def test_templates_that_do_not_compile(template, match):
    _refused(template, match, ModelLoadError)


@pytest.mark.slow
def test_the_largest_template_allowed_compiles_in_seconds():
    template = "{{ a ~ b ~ c }}" * (MAX_TEMPLATE_CHARS // 15)  # the slowest source to compile found, per character
    with within(6):
        chat._compile(template)


# ---- load time ----


def test_load_refuses_a_template_that_does_not_compile_and_names_the_file(tmp_path):
    path = tmp_path / "chat_template.jinja"
    path.write_text("{% if true %}" * 300, encoding="utf-8")
    with within(10), pytest.raises(ModelLoadError, match=rf"{path}: the chat template nests too deeply"):
        load_chat_template(tmp_path)
    path.write_text("{% for %}", encoding="utf-8")
    with pytest.raises(ModelLoadError, match=rf"{path}: the chat template is not valid jinja"):
        load_chat_template(tmp_path)
    path.unlink()
    config = tmp_path / "tokenizer_config.json"
    config.write_text('{"chat_template": "{{ x"}', encoding="utf-8")
    with pytest.raises(ModelLoadError, match=rf"{config}: the chat template is not valid jinja"):
        load_chat_template(tmp_path)
    config.write_text('{"chat_template": [{"name": "default", "template": "{% endfor %}"}]}', encoding="utf-8")
    with pytest.raises(ModelLoadError, match=rf"{config}: the chat template is not valid jinja"):
        load_chat_template(tmp_path)
    # a template that compiles but fails on every conversation still loads: the error comes at render
    path.write_text(NESTED_RANGES, encoding="utf-8")
    assert load_chat_template(tmp_path) == NESTED_RANGES


# ---- other failures ----


@pytest.mark.parametrize("template", ["", "{% if false %}x{% endif %}", "{{ '' }}", "{{ messages[5] }}"])
def test_a_template_that_renders_nothing_says_so(template):
    _refused(template, r"^the chat template rendered no text$")


def _raiser(error: BaseException):
    def boom() -> None:
        raise error

    return boom


@pytest.mark.parametrize(
    ("error", "match"),
    [
        (MemoryError(), r"ran out of memory while rendering"),
        (RecursionError("deep"), r"hit Python's recursion limit"),
        (RuntimeError("odd"), r"failed on this conversation: RuntimeError: odd"),
        (KeyError("k"), r"failed on this conversation: KeyError: 'k'"),
        (OSError("io"), r"failed on this conversation: OSError: io"),
    ],
)
def test_whatever_a_template_raises_is_the_package_error(error, match):
    _refused("{{ boom() }}", match, boom=_raiser(error))


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{{ 'a' + 1 }}", r"TypeError"),
        ("{{ 1.5 ** 100000 }}", r"OverflowError"),
        ("{{ 'abc'.index('z') }}", r"ValueError"),
        ("{% include 'x' %}", r"TypeError"),
    ],
)
def test_errors_of_the_template_code(template, match):
    _refused(template, rf"failed on this conversation: {match}")


def test_long_messages_are_shortened():
    with pytest.raises(InvalidRequestError) as e:
        render_chat(MSGS, "{{ raise_exception('x' * 1000000) }}")
    assert len(str(e.value)) < 500
    assert "1,000,000 characters" in str(e.value)


# ---- what still works ----

# Reference: the sandbox as transformers configures it, without the bounds.
_PLAIN = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
_PLAIN.filters["tojson"] = chat._tojson

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather at a place",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": " the city "},
                    "days": {"type": ["integer", "null"], "description": "how many"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    }
]

LEGIT = [
    # tools, a recursive macro over a JSON schema, tojson with indent, items, loop.last
    """{%- macro py_type(spec) -%}
{%- if spec.type == 'array' -%}list[{{ py_type(spec['items']) }}]
{%- elif spec.type is string -%}{{ {'string': 'str', 'integer': 'int'}.get(spec.type, 'Any') }}
{%- else -%}Union[{% for t in spec.type %}{{ py_type({'type': t}) }}{{ ', ' if not loop.last }}{% endfor %}]
{%- endif -%}
{%- endmacro -%}
{{ bos_token }}
{%- if tools %}<tools>
{% for tool in tools %}{% set f = tool.function %}{{ f.name ~ '(' }}
{%- for name, spec in f.parameters.properties|items %}{{ name + ': ' + py_type(spec) }}{{ ', ' if not loop.last }}
{%- endfor %}) - {{ f.description }}
{{ f.parameters|tojson(indent=4) }}
{% endfor %}</tools>
{% endif %}
{%- for message in messages %}
{{ '<|im_start|>' + message.role + '\n' + message.content|trim + '<|im_end|>' }}
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}""",
    # namespace accumulation, slicing, split, selectattr/map/join, loop helpers, % and format
    """{%- set ns = namespace(system='', n=0) -%}
{%- for m in messages if m.role == 'system' %}{% set ns.system = ns.system + m.content %}{% endfor -%}
{%- set rest = messages[1:] if messages[0].role == 'system' else messages -%}
[{{ ns.system|upper }}] {{ rest|selectattr('role', 'equalto', 'user')|map(attribute='content')|join(' | ') }}
{% for m in rest %}{% set ns.n = ns.n + 1 %}{{ '%02d/%d %s' % (loop.index, loop.length, m.role) }}
{{- ' {}:{}'.format(loop.cycle('odd', 'even'), loop.revindex0) }} {{ m.content.split('\n')[-1][:20] }}
{% if loop.index > 5 %}{% break %}{% endif %}{% endfor %}n={{ ns.n }} {{ "%s-%s"|format(eos_token, bos_token) }}""",
    # recursive loop over a tree, call blocks, set blocks, filter blocks, autoescape, string methods
    """{%- macro box(title) %}[{{ title }}: {{ caller() }}]{% endmacro -%}
{%- set header %}{% for m in messages %}{{ m.role[0]|upper }}{% endfor %}{% endset -%}
{%- call box(header|trim) %}{{ messages|length }} messages{% endcall %}
{% for node in tree recursive %}{{ node.name }}{% if node.children %}({{ loop(node.children) }}){% endif %}
{{- ',' if not loop.last }}{% endfor %}
{% filter upper %}{{ messages[-1].content|replace('o', '0')|center(30) }}{% endfilter %}
{% autoescape true %}{{ '<b>' ~ messages[0].content ~ '</b>' }}{% endautoescape %}
{{ messages|map(attribute='content')|map('length')|sum }} {{ messages|map(attribute='role')|unique|sort|join(',') }}
{{ '  x  '.strip() ~ 'a,b'.split(',')|reverse|join ~ 'abc'.ljust(6, '.') ~ ('%.3f' % 3.14159) }}
{{ range(3)|batch(2)|list }} {{ [3, 1, 2]|sort(reverse=true) }} {{ {'b': 1, 'a': 2}|dictsort }}""",
]

CONVERSATION = [
    {"role": "system", "content": "Be terse.\nAnd kind."},
    {"role": "user", "content": "Hello <there> & you"},
    {"role": "assistant", "content": "Hi.\nHow can I help?"},
    {"role": "user", "content": "Weather in Zürich for 3 days, please 😀"},
] * 3
TREE = [{"name": "a", "children": [{"name": "b", "children": []}, {"name": "c", "children": [{"name": "d"}]}]}]


@pytest.mark.parametrize("template", LEGIT)
def test_legitimate_templates_render_as_plain_jinja_renders_them(template):
    variables = {"tools": TOOLS, "tree": TREE, "bos_token": "<s>", "eos_token": "</s>"}
    for messages in (CONVERSATION, CONVERSATION[1:2]):
        for gen in (True, False):
            expected = _PLAIN.from_string(template).render(messages=messages, add_generation_prompt=gen, **variables)
            assert render_chat(messages, template, add_generation_prompt=gen, **variables) == expected


def test_a_long_conversation_renders_within_the_limits():
    messages = [{"role": ("user", "assistant")[i % 2], "content": f"{i} " + "w" * 2500} for i in range(1200)]
    text = render_chat(messages, None)  # within the deadline and every cap
    assert len(text) > 3_000_000
    assert text.endswith("<|assistant|>") and text.count("<|end|>") == 1200


def test_a_refused_render_leaves_nothing_behind(short_deadline):
    _refused(NESTED_RANGES, "took more than")
    _refused("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "nested calls")
    assert chat._budget() is None
    assert render_chat(MSGS, None) == "<|user|>hi<|end|><|assistant|>"


def test_renders_on_other_threads_keep_their_own_budget(short_deadline):
    """A hostile render running out its deadline on one thread does not slow or fail another's."""
    results: dict[str, object] = {}

    def run(name: str, template: str | None) -> None:
        try:
            results[name] = render_chat(MSGS, template)
        except InvalidRequestError as e:
            results[name] = e

    hostile = threading.Thread(target=run, args=("hostile", NESTED_RANGES))
    hostile.start()
    for k in range(20):
        run(f"good{k}", None)
        assert results[f"good{k}"] == "<|user|>hi<|end|><|assistant|>"
    hostile.join(timeout=5)
    assert not hostile.is_alive()
    assert isinstance(results["hostile"], InvalidRequestError)


# ---- through the engine ----


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return cached_model(SyntheticSpec(layout="gqa", seed=51), tmp_path_factory.mktemp("hostile"))


def _with_template(model_dir, tmp_path, template: str):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    return folder


def test_engine_refuses_a_template_that_does_not_compile_at_load(model_dir, tmp_path):
    from engine.generation import Engine

    folder = _with_template(model_dir, tmp_path, "{{ " + "(" * 500 + "1" + ")" * 500 + " }}")
    with within(20), pytest.raises(ModelLoadError, match=r"chat_template.jinja: the chat template nests too deeply"):
        Engine(folder, max_length=64)


def test_engine_answers_the_same_after_hostile_renders(model_dir, tmp_path, short_deadline):
    from engine.generation import Engine

    template = (
        "{% if messages|length > 1 %}" + NESTED_RANGES + "{% endif %}{{ 'x' * 10**11 if messages[0].content == 'big' }}"
    )
    eng = Engine(_with_template(model_dir, tmp_path, template + "{{ messages[0].content }}"), max_length=64)
    try:
        before = eng.generate("hello there", 8)
        with within(10):
            with pytest.raises(InvalidRequestError, match="took more than"):
                eng.render_chat(MSGS * 2)
            with pytest.raises(InvalidRequestError, match="would make about"):
                eng.chat([{"role": "user", "content": "big"}], 4)
        after = eng.generate("hello there", 8)
        assert after.token_ids == before.token_ids and after.text == before.text
        assert eng.render_chat(MSGS) == eng.tokenizer.encode("hi", add_special_tokens=False)
    finally:
        eng.close()


if sys.platform == "win32":  # SIGALRM, which ``within`` relies on, is POSIX only
    pytestmark = pytest.mark.skip(reason="needs signal.SIGALRM")

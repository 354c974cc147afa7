"""Tokenizers and the incremental detokenizer.

Real tokenizers from ../shared (skipped when absent): stories260k (sentencepiece, byte fallback),
tiny-llama-fp16 (HF tokenizer.json, Llama 32k: Replace/ByteFallback/Fuse/Strip decoder) and Phi-3
(HF, special chat tokens). A small byte-level BPE tokenizer trained here from a few sentences
(GPT-2 style ByteLevel decoder) runs everywhere.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import InvalidRequestError, ModelFileNotFoundError, ModelLoadError
from engine.text import IncrementalDetokenizer
from engine.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

from .conftest import load_reference, shared_param

UNICODE_SAMPLES = [
    "Once upon a time",
    "中文字符和日本語のテキスト",
    "emoji 😀🎉 and a family 👨‍👩‍👧 in one go",
    "café, naïve, Ångström, São Paulo",
    "  two leading spaces and   three inside",
    "line one\nline two\n\n\ttabbed",
    "rare scripts: ꙮ \U0001d518\U0001d52b\U0001d526 ʃ ƛ",  # Fraktur U, n, i
    "",
]

# ------------------------------------------------------------------------------------------------
# fixtures


def _train_byte_level(folder: Path, config: dict | None, post_processor: bool = False) -> Path:
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<|endoftext|>", "<s>", "<|user|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["Once upon a time there was a little cat. The cat liked the sun.", *UNICODE_SAMPLES]
    tok.train_from_iterator(corpus * 4, trainer)
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory) -> Path:
    return _train_byte_level(
        tmp_path_factory.mktemp("byte_level"),
        {"bos_token": "<s>", "eos_token": "<|endoftext|>", "add_bos_token": False},
    )


@pytest.fixture(scope="module")
def byte_level(byte_level_dir) -> Tokenizer:
    return load_tokenizer(byte_level_dir)


@pytest.fixture(scope="module")
def sp_tok(stories260k) -> Tokenizer:
    return load_tokenizer(stories260k)


@pytest.fixture(scope="module")
def llama_tok(tiny_llama_fp16) -> Tokenizer:
    return load_tokenizer(tiny_llama_fp16)


@pytest.fixture(scope="module")
def phi3_tok(phi3_tokenizer_dir) -> Tokenizer:
    return load_tokenizer(phi3_tokenizer_dir)


@pytest.fixture(params=["byte_level", *(shared_param(n) for n in ("sp_tok", "llama_tok", "phi3_tok"))])
def any_tok(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def stream(tok: Tokenizer, prompt: list[int], new: list[int], skip: bool = True) -> list[str]:
    """Every push's output, then the flush's."""
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    parts = [detok.push(i) for i in new]
    parts.append(detok.flush())
    assert detok.text == "".join(parts)
    return parts


def assert_streams_exactly(tok: Tokenizer, prompt: list[int], new: list[int], skip: bool = True) -> None:
    parts = stream(tok, prompt, new, skip)
    expected = IncrementalDetokenizer.continuation(tok, prompt, new, skip)
    assert "".join(parts) == expected
    # A U+FFFD shows up mid-stream only where the final text has one too.
    if "\ufffd" not in expected:
        assert all("\ufffd" not in p for p in parts)


# ------------------------------------------------------------------------------------------------
# stories260k: sentencepiece


def test_stories260k_encodes_reference_prompts(sp_tok, stories260k):
    assert isinstance(sp_tok, SentencePieceTokenizer)
    assert (sp_tok.vocab_size, sp_tok.bos_token_id, sp_tok.eos_token_ids, sp_tok.add_bos) == (
        512,
        1,
        (2,),
        True,
    )
    for ref in load_reference(stories260k):
        assert sp_tok.encode(ref["prompt"]) == ref["prompt_ids"]
        assert sp_tok.encode(ref["prompt"], add_special_tokens=False) == ref["prompt_ids"][1:]
        assert sp_tok.decode(ref["prompt_ids"]) == ref["prompt"]


def test_stories260k_streams_reference_continuation(sp_tok, stories260k):
    for ref in load_reference(stories260k):
        parts = stream(sp_tok, ref["prompt_ids"], ref["greedy_ids"])
        assert "".join(parts) == ref["continuation"]
        assert IncrementalDetokenizer.continuation(sp_tok, ref["prompt_ids"], ref["greedy_ids"]) == ref["continuation"]
        first = next(p for p in parts if p)
        assert ref["continuation"].startswith(first)
    once = next(r for r in load_reference(stories260k) if r["prompt"] == "Once upon a time")
    assert stream(sp_tok, once["prompt_ids"], once["greedy_ids"])[0] == ","


def test_stories260k_word_after_prompt_keeps_its_space(sp_tok):
    prompt = sp_tok.encode("Once upon a time")
    new = sp_tok.encode("there was", add_special_tokens=False)
    assert "".join(stream(sp_tok, prompt, new)) == " there was"


def test_sentencepiece_special_tokens(sp_tok):
    assert {0, 1, 2} <= sp_tok.special_ids
    once = sp_tok.encode("Once", add_special_tokens=False)
    assert sp_tok.decode([1, *once, 2]) == "Once"
    assert sp_tok.decode([1, *once, 2, *once], skip_special_tokens=False) == "<s> Once</s> Once"
    # Special-token strings in a text become their ids (legacy: the text after gets the dummy space).
    assert sp_tok.encode("<s>Once</s>", add_special_tokens=False) == [1, *once, 2]


def test_sentencepiece_legacy_false_encodes_text_after_special_as_written(stories260k, tmp_path):
    (tmp_path / "tokenizer.model").symlink_to(stories260k / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": False}), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("<s>Once", add_special_tokens=False)
    assert ids[0] == 1
    assert not tok.id_to_piece(ids[1]).startswith("\u2581")
    assert tok.decode(ids) == "Once"
    assert tok.encode("<s> Once", add_special_tokens=False) == [
        1,
        *tok.encode("Once", add_special_tokens=False),
    ]


def test_sentencepiece_defaults_without_config(stories260k, tmp_path):
    (tmp_path / "tokenizer.model").symlink_to(stories260k / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    # No tokenizer_config.json: BOS/EOS from the model, add_bos like transformers' LlamaTokenizer.
    assert (tok.bos_token_id, tok.eos_token_ids, tok.add_bos) == (1, (2,), True)


# ------------------------------------------------------------------------------------------------
# tiny-llama: HF tokenizer.json (Metaspace-style decoder, byte fallback)


def test_tiny_llama_tokenizer_json(llama_tok, tiny_llama_fp16):
    assert isinstance(llama_tok, HFTokenizer)
    assert (llama_tok.vocab_size, llama_tok.bos_token_id, llama_tok.eos_token_ids) == (32000, 1, (2,))
    assert llama_tok.pad_token_id == 0 and llama_tok.add_bos
    for ref in load_reference(tiny_llama_fp16):
        text = llama_tok.decode(ref["prompt_ids"])
        assert llama_tok.encode(text) == ref["prompt_ids"]
        assert_streams_exactly(llama_tok, ref["prompt_ids"], ref["greedy_ids"])
    assert llama_tok.encode("Hello world") == [1, 15043, 3186]
    assert llama_tok.id_to_piece(15043) == "\u2581Hello"


def test_tiny_llama_emoji_over_byte_tokens_never_streams_broken(llama_tok):
    prompt = llama_tok.encode("I feel")
    new = llama_tok.encode("😀 and 中文 ꙮ", add_special_tokens=False)  # the dummy prefix adds " "
    assert sum(llama_tok.id_to_piece(i).startswith("<0x") for i in new) >= 7  # 😀 and ꙮ are bytes
    parts = stream(llama_tok, prompt, new)
    assert "".join(parts) == " 😀 and 中文 ꙮ"
    assert all("\ufffd" not in p for p in parts)
    assert "😀" in "".join(p for p in parts if "😀" in p)  # arrives whole, in one piece


def test_prompt_ending_inside_a_character(llama_tok, sp_tok):
    for tok in (llama_tok, sp_tok):
        ids = tok.encode("smile 😀 now")
        cut = next(k for k in range(len(ids)) if tok.id_to_piece(ids[k]) == "<0xF0>") + 2
        prompt, new = ids[:cut], ids[cut:]
        assert tok.decode(prompt).endswith("\ufffd")
        parts = stream(tok, prompt, new)
        assert "".join(parts) == "😀 now" == IncrementalDetokenizer.continuation(tok, prompt, new)


@pytest.mark.slow
def test_overrides_win(tiny_llama_fp16):
    tok = load_tokenizer(tiny_llama_fp16, bos_token_id=0, eos_token_id=[1, 2], pad_token_id=2)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (0, (1, 2), 2)
    assert tok.encode("Hello")[0] == 0
    assert {0, 1, 2} <= tok.special_ids
    assert load_tokenizer(tiny_llama_fp16, eos_token_id=7).eos_token_ids == (7,)
    with pytest.raises(ModelLoadError, match="eos_token_id"):
        load_tokenizer(tiny_llama_fp16, eos_token_id=["x"])
    with pytest.raises(ModelLoadError, match="bos_token_id"):
        load_tokenizer(tiny_llama_fp16, bos_token_id=-1)


# ------------------------------------------------------------------------------------------------
# Phi-3: special chat tokens


def test_phi3_special_tokens_are_single_ids(phi3_tok):
    expected = {"<|system|>": 32006, "<|user|>": 32010, "<|assistant|>": 32001, "<|end|>": 32007}
    for token, i in expected.items():
        assert phi3_tok.encode(token, add_special_tokens=False) == [i]
        assert phi3_tok.id_to_piece(i) == token
        assert i in phi3_tok.special_ids
    assert phi3_tok.eos_token_ids == (32000,)
    ids = phi3_tok.encode("<|user|>\nHi there<|end|>\n<|assistant|>\n", add_special_tokens=False)
    assert ids[0] == 32010 and 32007 in ids and ids[-1] == 32001
    assert phi3_tok.decode(ids) == "\nHi there \n"
    assert "<|end|>" in phi3_tok.decode(ids, skip_special_tokens=False)


def test_phi3_stream_skips_or_keeps_special_tokens(phi3_tok):
    prompt = phi3_tok.encode("<|user|>\nHi<|end|>\n<|assistant|>\n", add_special_tokens=False)
    new = [*phi3_tok.encode("Hello there!", add_special_tokens=False), 32007, 32000]
    assert "".join(stream(phi3_tok, prompt, new)) == " Hello there!"
    kept = "".join(stream(phi3_tok, prompt, new, skip=False))
    assert kept == " Hello there!<|end|><|endoftext|>"


# ------------------------------------------------------------------------------------------------
# every tokenizer


def test_unicode_round_trip(any_tok):
    for text in UNICODE_SAMPLES:
        assert any_tok.decode(any_tok.encode(text)) == text


def test_stream_equals_decode_for_every_prompt_split(any_tok):
    for text in UNICODE_SAMPLES:
        ids = any_tok.encode(text)
        for cut in range(len(ids) + 1):
            assert_streams_exactly(any_tok, ids[:cut], ids[cut:])
            assert_streams_exactly(any_tok, ids[:cut], ids[cut:], skip=False)


def test_long_generation_cuts_the_window(any_tok):
    text = " ".join(UNICODE_SAMPLES) * 8
    ids = any_tok.encode(text)
    assert len(ids) > 200
    # The window holds a run of byte pieces whole (HF ByteFallback decodes a run at once).
    longest_run = run = 0
    for i in ids:
        run = run + 1 if i in any_tok._run_ids else 0
        longest_run = max(longest_run, run)
    detok = IncrementalDetokenizer(any_tok, ids[:3])
    for i in ids[3:]:
        detok.push(i)
        assert len(detok._ids) <= IncrementalDetokenizer._MAX + longest_run + 1  # constant work per token
    detok.flush()
    assert detok.text == IncrementalDetokenizer.continuation(any_tok, ids[:3], ids[3:])


def test_literal_table_matches_decode(any_tok):
    """The detokenizer's fast path: a listed token adds exactly its listed text after a prefix."""
    table = any_tok._literal_texts()
    assert table, "a known decoder should have a literal table"
    prefix = any_tok.encode("a", add_special_tokens=False)
    base = any_tok.decode(prefix)
    ids = sorted(table)
    if len(ids) > 4000:  # the whole 32k vocabulary takes ~0.3 s per tokenizer; sample it
        ids = random.Random(0).sample(ids, 4000)
    for i in ids:
        assert any_tok.decode([*prefix, i]) == base + table[i], (i, any_tok.id_to_piece(i))


def test_input_checks(any_tok):
    with pytest.raises(InvalidRequestError, match="must be a str"):
        any_tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        any_tok.id_to_piece(any_tok.vocab_size)
    ids = any_tok.encode("Once upon", add_special_tokens=False)
    assert any_tok.decode([*ids, any_tok.vocab_size + 5, -1]) == any_tok.decode(ids)


# ------------------------------------------------------------------------------------------------
# byte-level BPE built here (no ../shared needed)


def test_byte_level_tokenizer(byte_level):
    assert isinstance(byte_level, HFTokenizer)
    assert byte_level.add_bos is False  # the config says so
    assert byte_level.bos_token_id == byte_level.encode("<s>", add_special_tokens=False)[0]
    ids = byte_level.encode("😀 中文")
    assert any("\ufffd" in byte_level.decode([i]) for i in ids)  # tokens hold parts of characters
    parts = stream(byte_level, byte_level.encode("Once"), ids)
    assert "".join(parts) == "😀 中文"
    assert all("\ufffd" not in p for p in parts)
    user = byte_level.encode("<|user|>", add_special_tokens=False)
    assert len(user) == 1 and user[0] in byte_level.special_ids


def test_add_bos_default_follows_post_processor(tmp_path):
    with_bos = load_tokenizer(_train_byte_level(tmp_path / "a", None, post_processor=True))
    assert with_bos.add_bos and with_bos.encode("hi")[0] == with_bos.bos_token_id
    without = load_tokenizer(_train_byte_level(tmp_path / "b", None))
    assert not without.add_bos and without.bos_token_id is None and without.eos_token_ids == ()


def test_tokenizer_json_wins_over_tokenizer_model(byte_level_dir, stories260k, tmp_path):
    (tmp_path / "tokenizer.json").symlink_to(byte_level_dir / "tokenizer.json")
    (tmp_path / "tokenizer.model").symlink_to(stories260k / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)


# ------------------------------------------------------------------------------------------------
# errors


def test_missing_folder_and_missing_tokenizer(tmp_path):
    with pytest.raises(ModelFileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ModelFileNotFoundError) as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "tokenizer.json" in str(info.value) and "tokenizer.model" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("tokenizer.json", b'{"version": "1.0", "model": '),
        ("tokenizer.json", b'{"version": "1.0", "model": {"type": "Nope"}}'),
        ("tokenizer.model", b"\x00not a sentencepiece model\xff" * 10),
    ],
)
def test_corrupted_tokenizer(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load_tokenizer(tmp_path)


def test_corrupted_tokenizer_config(byte_level_dir, tmp_path):
    (tmp_path / "tokenizer.json").symlink_to(byte_level_dir / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"tokenizer_config\.json"):
        load_tokenizer(tmp_path)


def test_tokenizer_keeps_the_config_it_read(byte_level_dir, tmp_path):
    tok = load_tokenizer(byte_level_dir)
    assert tok.config == json.loads((byte_level_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer.json").symlink_to(byte_level_dir / "tokenizer.json")
    assert load_tokenizer(tmp_path).config == {}  # no tokenizer_config.json


# ------------------------------------------------------------------------------------------------
# properties: the stream equals the non-streamed text

_POOLS: dict[int, list[int]] = {}


def _pool(tok: Tokenizer) -> list[int]:
    """Ids that stress the detokenizer: byte pieces, space pieces, specials, out-of-range ids."""
    key = id(tok)
    if key not in _POOLS:
        pieces = [(i, tok.id_to_piece(i)) for i in range(tok.vocab_size)]
        byte_ids = [i for i, p in pieces if p.startswith("<0x")]
        space_ids = [i for i, p in pieces if p.startswith(("\u2581", "\u0120"))][:60]
        other = [i for i, p in pieces if not p.startswith("<0x")][:80]
        words = tok.encode("中文 😀 café  a\n\nb ꙮ", add_special_tokens=False)
        _POOLS[key] = [
            *byte_ids,
            *space_ids,
            *other,
            *words,
            *sorted(tok.special_ids)[:6],
            tok.vocab_size + 1,
        ]
    return _POOLS[key]


_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(data=st.data(), skip=st.booleans())
def test_random_ids_stream_exactly(any_tok, data, skip):
    pool = _pool(any_tok)
    ids = st.lists(st.sampled_from(pool), max_size=40)
    assert_streams_exactly(any_tok, data.draw(ids.map(lambda x: x[:12])), data.draw(ids), skip)


@_SETTINGS
@given(data=st.data(), text=st.text(st.characters(exclude_categories=["Cs"]), max_size=40))
def test_random_text_streams_exactly(any_tok, data, text):
    ids = any_tok.encode(text)
    cut = data.draw(st.integers(0, len(ids)))
    assert "".join(stream(any_tok, ids[:cut], ids[cut:])) == IncrementalDetokenizer.continuation(
        any_tok, ids[:cut], ids[cut:]
    )
    if cut == 0 or (cut == 1 and any_tok.add_bos):
        assert "".join(stream(any_tok, ids[:cut], ids[cut:])) == any_tok.decode(ids)

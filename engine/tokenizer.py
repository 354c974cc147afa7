"""Tokenizers (HF ``tokenizers`` and sentencepiece) behind one interface.

Streaming detokenization (:class:`~engine.text.IncrementalDetokenizer`) lives in :mod:`engine.text`.

Which file, and why
    :func:`load_tokenizer` prefers ``tokenizer.json`` (HF ``tokenizers``) over ``tokenizer.model``
    (sentencepiece), as ``transformers.AutoTokenizer`` (fast tokenizers by default) and
    onnxruntime-genai do. ``tokenizer_config.json`` and ``special_tokens_map.json`` name the special
    tokens; the ids the engine passes in (from ``genai_config.json``) override them.

BOS
    ``encode(text)`` prepends ``bos_token_id`` when ``add_special_tokens`` and :attr:`Tokenizer.add_bos`
    are true. ``add_bos`` is ``tokenizer_config.json``'s ``add_bos_token``. When that key is absent, a
    sentencepiece tokenizer adds BOS (``transformers.LlamaTokenizer`` defaults ``add_bos_token`` to
    true) and a ``tokenizer.json`` adds it when its own post-processor does. No other special token is
    ever added (``add_eos_token`` is not applied: a decoder-only prompt never ends with EOS).

Decoding
    ``decode`` drops ids outside ``[0, vocab_size)`` (as HF ``tokenizers`` does; a model's embedding
    is often padded past the tokenizer's vocabulary) and, with ``skip_special_tokens``, every id in
    :attr:`Tokenizer.special_ids` before the decoder runs, so a skipped token never changes the text
    around it. ``transformers``' ``clean_up_tokenization_spaces`` is never applied (onnxruntime-genai
    does not apply it either): decoded text is the tokenizer's own decode, which keeps streaming exact.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import entry_kind, open_regular, read_json_object, read_text
from .errors import InvalidRequestError, ModelFileNotFoundError, ModelLoadError

__all__ = ["Tokenizer", "load_tokenizer"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
MAX_TOKENIZER_BYTES = 2**30  # a tokenizer file larger than this (1 GiB) is refused unread
_REPLACEMENT = "\ufffd"  # what every decoder writes for bytes that are not (yet) valid UTF-8
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # byte-fallback piece, e.g. <0xE4>


class Tokenizer:
    """What the engine needs from a tokenizer. Subclasses implement the four ``_backend_*`` hooks.

    Attributes:
        vocab_size: number of token ids, added tokens included; ids outside ``[0, vocab_size)``
            decode to nothing.
        bos_token_id: prepended by :meth:`encode` when ``add_bos``; None if the tokenizer has none.
        eos_token_ids: every id that ends generation.
        pad_token_id: padding id, or None.
        add_bos: whether ``encode(text, add_special_tokens=True)`` prepends ``bos_token_id``.
        special_ids: ids that ``decode(..., skip_special_tokens=True)`` drops: the tokenizer's special
            tokens plus BOS, the EOS ids and PAD.
        config: the folder's ``tokenizer_config.json`` as :func:`load_tokenizer` read it (``{}`` when
            absent), for the other readers of that file (the chat template), so it is read once.
    """

    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    add_bos: bool
    special_ids: frozenset[int]
    config: Mapping[str, Any] = {}  # set per instance by load_tokenizer
    # Ids whose decoded text may still change while they end the sequence, because the decoder
    # validates a whole run of them at once (HF ByteFallback turns an entire run of <0xXX> pieces into
    # U+FFFD as soon as one byte in it is invalid). IncrementalDetokenizer holds such runs back.
    _run_ids: frozenset[int] = frozenset()
    _literals: dict[int, str] | None = None

    def _literal_texts(self) -> dict[int, str]:
        """Ids whose text never depends on their neighbours, mapped to the text each adds after a
        non-empty, settled prefix (``▁Once`` -> ``" Once"``). Lets the detokenizer skip the decode
        for most tokens. Built once (load_tokenizer builds it); empty when the decoder is not known
        to be local.
        """
        if self._literals is None:
            self._literals = self._build_literals()
        return self._literals

    def _build_literals(self) -> dict[int, str]:
        return {}

    # -- public API ---------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; BOS first when ``add_special_tokens`` and :attr:`add_bos`.

        Special-token strings in the text (``<|user|>``, ``<s>``) become their single ids whatever
        ``add_special_tokens`` says: a chat template writes them into the text on purpose.
        """
        _check_text(text)
        ids = self._backend_encode(text)
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Out-of-range ids are dropped; so are special ids when ``skip_special_tokens``.

        A sentence-initial space (sentencepiece's dummy prefix, a Metaspace ``▁``) is removed from the
        very start of the text only, so ``decode([bos, ▁Once])`` is ``"Once"`` and, keeping special
        tokens, ``"<s> Once"``.
        """
        if isinstance(ids, (str, bytes)):
            raise InvalidRequestError("decode takes a sequence of token ids, not a string")
        n = self.vocab_size
        if skip_special_tokens:
            special = self.special_ids
            kept = [int(i) for i in ids if 0 <= i < n and i not in special]
        else:
            kept = [int(i) for i in ids if 0 <= i < n]
        return self._backend_decode(kept)

    def id_to_piece(self, id: int) -> str:
        """The vocabulary string of one id (``▁Once``, ``<0x0A>``, ``<|end|>``)."""
        if not 0 <= id < self.vocab_size:
            raise InvalidRequestError(f"token id {id} is outside this tokenizer's vocabulary [0, {self.vocab_size})")
        return self._backend_piece(int(id))

    # -- backend hooks ------------------------------------------------------------------------

    def _backend_encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _backend_decode(self, ids: list[int]) -> str:
        """Decode in-range ids; special ids in ``ids`` are written as their text."""
        raise NotImplementedError

    def _backend_piece(self, id: int) -> str:
        raise NotImplementedError

    def _token_id(self, token: str) -> int | None:
        """Id of a whole-token string, or None if it is not one token."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
            f"eos_token_ids={self.eos_token_ids}, pad_token_id={self.pad_token_id}, add_bos={self.add_bos})"
        )


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        raise InvalidRequestError(f"text to encode must be a str, got {type(text).__name__}")


# ------------------------------------------------------------------------------------------------
# HF tokenizers backend


def _is_metaspace_like(decoder: object) -> bool:
    """The Llama decoders: ``Metaspace``, or Replace(▁ -> " "), ByteFallback, Fuse, Strip(one leading " ")."""
    if not isinstance(decoder, dict):
        return False
    if decoder.get("type") == "Metaspace":
        return decoder.get("replacement", "\u2581") == "\u2581"
    steps = decoder.get("decoders") if decoder.get("type") == "Sequence" else None
    if not isinstance(steps, list) or [d.get("type") for d in steps if isinstance(d, dict)] != [
        "Replace",
        "ByteFallback",
        "Fuse",
        "Strip",
    ]:
        return False
    replace, strip = steps[0], steps[3]
    return (
        replace.get("pattern") == {"String": "\u2581"}
        and replace.get("content") == " "
        and strip.get("content") == " "
        and strip.get("start") == 1
        and strip.get("stop") == 0
    )


def _decoder_types(node: object) -> set[str]:
    """Every decoder ``type`` named in a tokenizer.json ``decoder`` entry (Sequence nests them)."""
    if not isinstance(node, dict):
        return set()
    found = {str(node.get("type"))}
    for child in node.get("decoders") or ():
        found |= _decoder_types(child)
    return found


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` through the HF ``tokenizers`` library."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _HF

        text = read_text(path, MAX_TOKENIZER_BYTES, "tokenizer.json")
        try:
            spec = json.loads(text)
            self._tok = _HF.from_str(text)
        except Exception as e:  # the tokenizers library raises plain Exception on a bad file
            raise ModelLoadError(f"{path} is not a readable tokenizer.json: {e}") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._special = frozenset(
            int(t["id"]) for t in spec.get("added_tokens") or () if t.get("special") and "id" in t
        )
        self._decoder = spec.get("decoder")
        if "ByteFallback" in _decoder_types(self._decoder):
            vocab = self._tok.get_vocab(with_added_tokens=False)
            self._run_ids = frozenset(i for piece, i in vocab.items() if _BYTE_PIECE.fullmatch(piece))

    def _build_literals(self) -> dict[int, str]:
        vocab = self._tok.get_vocab(with_added_tokens=False)
        added = set(self._tok.get_added_tokens_decoder())
        if _is_metaspace_like(self._decoder):
            # Replace(▁ -> " ") + ByteFallback + Fuse + Strip(first space), or Metaspace: past the first
            # token, a non-byte piece adds its own text with ▁ as a space.
            return {
                i: piece.replace("\u2581", " ")
                for piece, i in vocab.items()
                if i not in added and i not in self._run_ids
            }
        if isinstance(self._decoder, dict) and self._decoder.get("type") == "ByteLevel":
            # Bytes joined, then decoded as UTF-8: a token whose bytes are whole characters adds its
            # own text after a prefix that ends on a character boundary (no trailing U+FFFD).
            ids = sorted(i for i in vocab.values() if i not in added)
            texts = self._tok.decode_batch([[i] for i in ids], skip_special_tokens=False)
            return {i: t for i, t in zip(ids, texts, strict=True) if _REPLACEMENT not in t}
        return {}

    def _backend_encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _backend_decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def _backend_piece(self, id: int) -> str:
        piece = self._tok.id_to_token(id)
        if piece is None:
            raise InvalidRequestError(f"token id {id} has no entry in this tokenizer")
        return piece

    def _token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _post_processor_prefix(self) -> list[int]:
        """Ids the tokenizer.json post-processor puts in front of a text (e.g. ``[<s>]``)."""
        with_special = self._tok.encode("a", add_special_tokens=True).ids
        plain = self._tok.encode("a", add_special_tokens=False).ids
        k = len(with_special) - len(plain)
        if k > 0 and with_special[k:] == plain:
            return with_special[:k]
        return []


# ------------------------------------------------------------------------------------------------
# sentencepiece backend


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``tokenizer.model``.

    Control pieces (``<s>``, ``</s>``), the unknown piece and the added tokens of
    ``tokenizer_config.json`` are special: their strings in a text encode to their ids (as
    ``transformers``' slow tokenizer splits on them). With ``legacy`` true (the ``transformers``
    default) the text after such a token gets sentencepiece's dummy-prefix space like any text;
    with ``legacy: false`` it is encoded as written.
    """

    def __init__(self, path: Path, added: Mapping[str, int], legacy: bool) -> None:
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError, ValueError) as e:
            raise ModelLoadError(f"{path} is not a readable sentencepiece model: {e}") from e
        self._path = path
        self._legacy = legacy
        sp = self._sp
        n = sp.get_piece_size()
        self._pieces = [sp.id_to_piece(i) for i in range(n)]
        self._special = frozenset(i for i in range(n) if sp.is_control(i) or sp.is_unknown(i))
        # Tokens that are written as their own text: specials, and added tokens past the model's pieces.
        self._added = {tok: int(i) for tok, i in added.items()}
        self._added_text = {i: tok for tok, i in self._added.items()}
        for i in self._special:
            self._added.setdefault(self._pieces[i], i)
            self._added_text.setdefault(i, self._pieces[i])
        self.vocab_size = max([n, *(i + 1 for i in self._added_text)])
        self._split = (
            re.compile("(" + "|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True)) + ")")
            if self._added
            else None
        )
        self._no_prefix_sp: Any = None  # processor without the dummy prefix, built on first need
        # Does sentencepiece drop the space of the first piece (add_dummy_prefix)? Ask it once.
        first_ws = next((i for i in range(n) if self._pieces[i].startswith("\u2581") and self._plain(i)), None)
        self._strips_first_space = first_ws is not None and not sp.decode([first_ws]).startswith(" ")

    def _build_literals(self) -> dict[int, str]:
        # A plain piece adds its text with ▁ as a space, once it is not the first piece. Check that
        # on one piece in case the model does not escape whitespace with ▁.
        sp, pieces = self._sp, self._pieces
        plain = [i for i in range(len(pieces)) if self._plain(i) and i not in self._added_text]
        ws = next((i for i in plain if pieces[i].startswith("\u2581")), None)
        if ws is None or sp.decode([ws, ws]) != sp.decode([ws]) + pieces[ws].replace("\u2581", " "):
            return {}
        return {i: pieces[i].replace("\u2581", " ") for i in plain}

    def _plain(self, i: int) -> bool:
        sp = self._sp
        return not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))

    def _encode_chunk(self, text: str, after_special: bool) -> list[int]:
        if after_special and not self._legacy:
            if self._no_prefix_sp is None:
                self._no_prefix_sp = self._processor_without_prefix()
            return self._no_prefix_sp.encode(text)
        return self._sp.encode(text)

    def _processor_without_prefix(self) -> Any:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(self._path.read_bytes())
        proto.normalizer_spec.add_dummy_prefix = False
        return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def _backend_encode(self, text: str) -> list[int]:
        if self._split is None or self._split.search(text) is None:
            return self._sp.encode(text)
        ids: list[int] = []
        after_special = False
        for k, chunk in enumerate(self._split.split(text)):
            if k % 2:  # odd chunks are the captured special-token strings
                ids.append(self._added[chunk])
                after_special = True
            elif chunk:
                ids.extend(self._encode_chunk(chunk, after_special))
        return ids

    def _backend_decode(self, ids: list[int]) -> str:
        written = self._added_text
        if not any(i in written for i in ids):
            return self._sp.decode(ids)
        # Special tokens are kept: write their text, decode the runs between them with sentencepiece,
        # and give back the leading space sentencepiece drops from any run that is not at the start.
        parts: list[str] = []
        run: list[int] = []
        for i in [*ids, -1]:
            if i != -1 and i not in written:
                run.append(i)
                continue
            if run:
                text = self._sp.decode(run)
                if parts and self._strips_first_space and self._pieces[run[0]].startswith("\u2581"):
                    text = " " + text
                parts.append(text)
                run = []
            if i != -1:
                parts.append(written[i])
        return "".join(parts)

    def _backend_piece(self, id: int) -> str:
        if id in self._added_text and id >= len(self._pieces):
            return self._added_text[id]
        return self._pieces[id]

    def _token_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        i = self._sp.piece_to_id(token)
        return i if self._pieces[i] == token else None


# ------------------------------------------------------------------------------------------------
# loading


def _read_json(path: Path) -> dict[str, Any]:
    """A tokenizer config file as a dict; {} when absent. A file that is there but is not a
    regular, bounded UTF-8 JSON object raises ModelLoadError."""
    return read_json_object(path, "tokenizer config") if entry_kind(path) is not None else {}


def _token_text(value: object, where: str = "") -> str | None:
    """A special-token entry of tokenizer_config.json: a string or ``{"content": ...}``; None is
    None. With ``where`` (the field, for the message), anything else raises ModelLoadError."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    if where:
        raise ModelLoadError(f"{where} must be a string or an object with a string 'content', found {value!r}")
    return None


def _added_tokens(config: Mapping[str, Any], path: Path) -> tuple[dict[str, int], set[int]]:
    """``added_tokens_decoder`` of tokenizer_config.json: content -> id, and the special ids."""
    added: dict[str, int] = {}
    special: set[int] = set()
    table = config.get("added_tokens_decoder") or {}
    if not isinstance(table, dict):
        raise ModelLoadError(f"{path}: added_tokens_decoder must be an object of id -> token, found {table!r:.80}")
    for key, entry in table.items():
        where = f"{path}: added_tokens_decoder[{key!r}]"
        content = _token_text(entry, where)
        if not key.isdigit():
            raise ModelLoadError(f"{where}: the key must be a token id (decimal digits)")
        i = int(key)
        if content is None:
            raise ModelLoadError(f"{where} must be a string or an object with a string 'content', found None")
        added[content] = i
        if isinstance(entry, dict) and entry.get("special"):
            special.add(i)
    return added, special


def _ids(value: int | Sequence[int] | None, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, int) else list(value)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ModelLoadError(f"{name} must be a non-negative int or a list of them, got {value!r}")
    return tuple(values)


def _one_id(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelLoadError(f"{name} must be a non-negative int, got {value!r}")
    return value


def load_tokenizer(
    model_dir: str | Path,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> Tokenizer:
    """Load the tokenizer of a model folder.

    ``tokenizer.json`` wins over ``tokenizer.model`` (see the module docstring). Special tokens come
    from ``tokenizer_config.json``, then ``special_tokens_map.json``, then the sentencepiece model's
    own ids. ``bos_token_id``, ``eos_token_id`` (one id or a list, as in genai_config.json) and
    ``pad_token_id``, when given, win over all of those; ``bos_token_id`` is then also the id that
    :meth:`Tokenizer.encode` prepends.

    Raises:
        ModelFileNotFoundError: the folder does not exist or holds neither tokenizer file.
        ModelLoadError: a tokenizer or config file is corrupted, or an override is not an id.
    """
    folder = Path(model_dir)
    if entry_kind(folder) != "dir":
        raise ModelFileNotFoundError(f"model folder {folder} does not exist")
    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path)
    special_map = _read_json(folder / "special_tokens_map.json")
    added, added_special = _added_tokens(config, config_path)
    for key, allowed in (("legacy", (bool,)), ("add_bos_token", (bool,)), ("additional_special_tokens", (list,))):
        if config.get(key) is not None and not isinstance(config[key], allowed):
            kind = "true, false or null" if allowed == (bool,) else "a list of tokens"
            raise ModelLoadError(f"{config_path}: {key} must be {kind}, found {config[key]!r:.80}")

    tok: Tokenizer
    hf_path, sp_path = (folder / f for f in _TOKENIZER_FILES)
    if entry_kind(hf_path) is not None:
        tok = HFTokenizer(hf_path)
    elif entry_kind(sp_path) is not None:
        open_regular(sp_path, MAX_TOKENIZER_BYTES, "tokenizer.model").close()  # not a FIFO or device
        legacy = config.get("legacy")
        tok = SentencePieceTokenizer(sp_path, added, legacy is not False)
    else:
        raise ModelFileNotFoundError(f"no tokenizer in {folder}: looked for {' and '.join(_TOKENIZER_FILES)}")

    def named(key: str) -> tuple[bool, int | None]:
        """(whether the configs name the token, its id)."""
        for source, path in ((config, config_path), (special_map, folder / "special_tokens_map.json")):
            if key in source:
                text = _token_text(source[key], f"{path}: {key}")
                return True, (tok._token_id(text) if text is not None else None)
        return False, None

    sp = tok._sp if isinstance(tok, SentencePieceTokenizer) else None
    prefix = tok._post_processor_prefix() if isinstance(tok, HFTokenizer) else []

    found, bos = named("bos_token")
    if not found:
        if sp is not None:
            bos = sp.bos_id() if sp.bos_id() >= 0 else None
        elif len(prefix) == 1:
            bos = prefix[0]
    found, eos = named("eos_token")
    if not found and sp is not None and sp.eos_id() >= 0:
        eos = sp.eos_id()
    found, pad = named("pad_token")
    if not found and sp is not None and sp.pad_id() >= 0:
        pad = sp.pad_id()
    _, unk = named("unk_token")

    if bos_token_id is not None:
        bos = _one_id(bos_token_id, "bos_token_id")
    if pad_token_id is not None:
        pad = _one_id(pad_token_id, "pad_token_id")
    eos_ids = _ids(eos_token_id, "eos_token_id")
    if eos_ids is None:
        eos_ids = () if eos is None else (eos,)

    if config.get("add_bos_token") is not None:
        add_bos = config["add_bos_token"]
    else:
        add_bos = sp is not None or (bos is not None and prefix == [bos])

    extra = [i for i in (bos, pad, unk, *eos_ids) if i is not None]
    for text in config.get("additional_special_tokens") or ():
        i = tok._token_id(_token_text(text, f"{config_path}: additional_special_tokens entry") or "")
        if i is not None:
            extra.append(i)
    tok.bos_token_id = bos
    tok.eos_token_ids = tuple(dict.fromkeys(eos_ids))
    tok.pad_token_id = pad
    tok.add_bos = add_bos and bos is not None
    tok.special_ids = frozenset(getattr(tok, "_special", frozenset()) | added_special | set(extra))
    tok.config = config
    tok._literal_texts()  # built now, so the first streamed request does not pay for it
    return tok

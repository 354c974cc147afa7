"""Prompt-lookup speculative decoding: the n-gram drafter and the graph it needs.

On the CPU a batch-1 step of an INT4 model is bound by reading the weights once; a forward pass
over a few tokens costs little more than over one. So the loop (``generate_one_speculative`` in
engine/decode.py) guesses the next tokens from text already seen — the prompt and what was
generated so far — and checks them all in one pass of ``[1, K + 1]`` ids: the pending token and
``K`` drafts. Each verified position is sampled from its own logits, in order, exactly as a
plain step would (same penalties, one random draw per emitted token), and drafts are kept while
they equal the token chosen; the first mismatch is itself the next token. So greedy output is
token for token that of plain decoding and sampled output has the same distribution (a seeded
request draws the same stream). Rejected positions are dropped by bookkeeping: the next mask is
shorter and the share-buffer cache overwrites their slots later.

:class:`PromptLookupDrafter` keeps, for every n-gram size, a dict from the n-gram to where its
latest occurrence ended, brought up to date at each lookup (O(1) per token, no numpy), and proposes the
tokens that followed the longest n-gram matching the end of the text (n-grams are packed into one
int each, 32 bits per id, so that a token costs a few dict stores). Its width adapts: for each
match length (1 .. ``ngram``, and a longest match measured back up to ``LONG_MATCH`` ids further)
it keeps a decaying estimate of how often a draft is kept, and drafts the number of tokens that
maximises the expected tokens per pass over the pass's cost (measured: a pass of k + 1 tokens
cost 1.17 / 1.29 / 1.55 / 2.24 steps for k = 1 / 2 / 4 / 8 on stories260k here, and 1.04 / 1.26 /
1.67 / 2.54 on the Phi-4-mini-shaped INT4 model, issue 15; ``1 + draft_cost * k`` until timed).
Text copied from the prompt has long matches kept ~90 % of the time, where up to ``max_draft``
(8) drafts pay; a round with nothing kept starts a cooldown of plain steps that doubles while
rounds keep failing, so open-ended text pays for few wasted passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .errors import InvalidRequestError
from .graph import slice_logits_to_last

if TYPE_CHECKING:
    from .config import ModelSpec

PROMPT_LOOKUP = "prompt_lookup"
SPECULATION_MODES = (PROMPT_LOOKUP,)


@dataclass(frozen=True)
class SpeculationConfig:
    """Knobs of prompt lookup.

    Args:
        ngram: the longest n-gram matched against earlier text (tried from this size down to ``min_ngram``).
        min_ngram: the shortest n-gram that may propose drafts.
        max_draft: the most drafts verified in one pass (the pass runs ``max_draft + 1`` tokens).
        max_cooldown: the most plain steps taken after rounds in which no draft was kept.
        draft_cost: what each draft adds to the cost of a pass, in plain steps, until the passes'
            own times are measured (the drafter times every pass and uses those ratios from then on).
        exact: keep greedy output token for token that of plain decoding (default). A model whose
            matmuls round activations to int8 or half precision (``ModelSpec.coarse_activations``:
            MatMulNBits accuracy_level 4, the CPU INT4 exports) computes a verify pass's positions
            slightly differently from one-token steps, which can swap near-tied tokens; with
            ``exact`` such a model takes plain steps (a warning says so at load). False drafts
            anyway: faster, each token still the model's own choice at its position, but greedy
            output may part from plain decoding's at a near tie.
    """

    ngram: int = 3
    min_ngram: int = 1
    max_draft: int = 8
    max_cooldown: int = 16
    draft_cost: float = 0.15
    exact: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.exact, (bool, np.bool_)):
            raise InvalidRequestError(f"speculation option exact must be True or False, got {self.exact!r}")
        for name, lo, hi in (("ngram", 1, 16), ("min_ngram", 1, 16), ("max_draft", 1, 32), ("max_cooldown", 0, 1024)):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not lo <= value <= hi:
                raise InvalidRequestError(f"speculation option {name} must be an int in {lo}..{hi}, got {value!r}")
        cost = self.draft_cost
        if not isinstance(cost, (int, float)) or isinstance(cost, bool) or not 0.0 < cost <= 4.0:
            raise InvalidRequestError(f"speculation option draft_cost must be a number in (0, 4], got {cost!r}")
        if self.min_ngram > self.ngram:
            raise InvalidRequestError(f"min_ngram ({self.min_ngram}) must not exceed ngram ({self.ngram})")

    @property
    def width(self) -> int:
        """Tokens in the widest verify pass: the pending token and ``max_draft`` drafts."""
        return self.max_draft + 1


def check_mode(value: object) -> str | None:
    """``value`` as a speculation mode (None: off); InvalidRequestError for anything else."""
    if value is None or value is False:
        return None
    if value not in SPECULATION_MODES:
        raise InvalidRequestError(f"speculation must be None or 'prompt_lookup', got {value!r}")
    return PROMPT_LOOKUP


_DECAY = 0.7  # weight of the past in the kept-draft estimate, per round
_PRIOR = (0.6, 1.0)  # (kept, tried) the estimate starts from: a draft is kept 60% of the time
_COST_DECAY = 0.9  # weight of the past in each width's mean pass time
_REFRESH = 16  # passes timed between refreshes of the cost table the widths are chosen from
_FIT_DECAY = 0.98  # weight of the past in the line fitted to the passes' costs, per timed pass
# rounds in a row with nothing kept, and none kept before in the request: it stops drafting (with
# cooldowns of 1, 2, 4, 8 plain steps between them, after some 20 tokens)
GIVE_UP_MISSES = 5
# a match of ``ngram`` ids is measured back up to this many ids further; each extra length has its
# own estimate, from a higher prior: on stories260k a match of 6 ids or more is followed by the
# same token 91 % of the time, one of 3 ids 70-75 %, one of 1 id 14-38 % (24 prompts, issue 15)
LONG_MATCH = 3
_LONG_PRIORS = (0.75, 0.8, 0.85)  # the kept rate a match of ngram + 1, + 2, + 3 (or more) ids starts from
_UNIGRAM_PRIOR = 0.45  # and a match of one id (the same data: 14-38 % kept)


def _prior(length: int, ngram: int) -> float:
    """The kept rate the estimate of a match of ``length`` ids starts from."""
    if length > ngram:
        return _LONG_PRIORS[min(length - ngram, len(_LONG_PRIORS)) - 1]
    return _UNIGRAM_PRIOR if length == 1 else _PRIOR[0]


class PromptLookupDrafter:
    """N-gram drafts from the request's own text, with an adaptive width and a cooldown.

    ``start`` once per request (indexes the prompt), ``append`` every token emitted, ``propose``
    before a step (0: take a plain step), ``feedback`` after a verify pass. Counts ``drafted``
    and ``accepted`` for the request's stats.
    """

    def __init__(self, config: SpeculationConfig) -> None:
        self.config = config
        self.sizes = list(range(config.ngram, config.min_ngram - 1, -1))  # longest first
        # the estimates' keys: match lengths, longest first (past ``ngram``: a match extended backwards)
        self.keys = list(range(config.ngram + LONG_MATCH, config.ngram, -1)) + self.sizes
        self._top_mask = (1 << (32 * config.ngram)) - 1
        # width -> decayed mean seconds of a pass of that many tokens (index 0 unused; 0.0: not
        # measured yet); kept across requests: the costs belong to the model and the machine
        self.pass_s = [0.0] * (config.width + 1)
        self._table: list[float] | None = None  # costs(max_draft) as of the last refresh (None: stale)
        self._stale = 0  # passes timed since
        self.round_s = 0.0  # decayed mean host seconds of a verify round beyond its pass (observe_round)
        # decayed sums of the timed verify passes (weight, k, r, k * k, k * r): k drafts, r the
        # pass's time in plain steps; the least-squares line r = a + b * k gives every width's cost
        self._fit = [0.0] * 5
        self._rounds = 0  # rounds timed
        self.start([])

    def observe(self, width: int, seconds: float) -> None:
        """Record the time of one pass of ``width`` tokens (1: a plain step). An outlier past four
        times the mean so far (a recomputed cache, a preempted thread) is left out; one past twice
        the mean counts as twice the mean (a busy machine: the mean follows, slowly). A verify
        pass also enters the line fitted to the passes' costs in plain steps (:meth:`costs`)."""
        mean = self.pass_s[width]
        if mean == 0.0:
            self.pass_s[width] = seconds
            self._table = None  # a width timed for the first time: the widths' costs change at once
        elif seconds < 4.0 * mean:
            seconds = min(seconds, 2.0 * mean)
            self.pass_s[width] = _COST_DECAY * mean + (1.0 - _COST_DECAY) * seconds
            self._stale += 1
        else:
            return
        step = self.pass_s[1]
        if width > 1 and step > 0.0:  # (drafts, cost in plain steps) into the decayed sums of the fit
            k, r, fit = width - 1.0, seconds / step, self._fit
            fit[0] = _FIT_DECAY * fit[0] + 1.0
            fit[1] = _FIT_DECAY * fit[1] + k
            fit[2] = _FIT_DECAY * fit[2] + r
            fit[3] = _FIT_DECAY * fit[3] + k * k
            fit[4] = _FIT_DECAY * fit[4] + k * r

    def cost(self, drafts: int) -> float:
        """Cost of a verify round with ``drafts`` drafts, in plain steps: the line fitted to the
        timed passes (each relative to the plain step's mean when it ran; one line over every width,
        so that a width seldom timed on a noisy machine takes its cost from the others), plus the
        round's host time beyond its pass; ``1 + draft_cost * drafts`` until a pass is timed."""
        return self.costs(drafts)[drafts]

    def costs(self, most: int) -> list[float]:
        """:meth:`cost` of 0..``most`` drafts."""
        w0, wk, wr, wkk, wkr = self._fit
        per, step = self.config.draft_cost, self.pass_s[1]
        if w0 <= 0.0 or step <= 0.0:
            return [1.0 + per * k for k in range(most + 1)]
        spread = w0 * wkk - wk * wk
        # (one width timed so far: the configured slope through its mean)
        slope = (w0 * wkr - wk * wr) / spread if spread > 1e-6 * w0 * w0 else per
        slope = max(slope, 0.0)
        base = (wr - slope * wk) / w0 + self.round_s / step
        return [1.0] + [max(1.0, base + slope * k) for k in range(1, most + 1)]

    def observe_round(self, seconds: float) -> None:
        """Record the host time of one verify round beyond its pass (the lookup, the second
        position's sampling, the bookkeeping; timed on rounds that kept nothing, which yield no
        token in between). It is added to every width's cost: on stories260k a one-draft round
        that keeps nothing costs 0.4-0.5 plain steps more than a plain step, not the 0.25 of its
        pass alone."""
        mean = self.round_s
        if self._rounds == 0:
            self.round_s = max(0.0, seconds)
            self._table = None
        elif 0.0 <= seconds < 4.0 * mean + 20e-6:
            self.round_s = _COST_DECAY * mean + (1.0 - _COST_DECAY) * min(seconds, 2.0 * mean + 10e-6)
            self._stale += 1
        self._rounds += 1

    def start(self, prompt: list[int]) -> None:
        """A new request whose text so far is ``prompt``."""
        self.text: list[int] = []
        # n -> {key of an n-gram: index just past its latest occurrence (not the end of the text)};
        # an n-gram's key packs its ids 32 bits apart (one int: no tuple per token)
        self.index: dict[int, dict[int, int]] = {n: {} for n in self.sizes}
        # (n, its index, the mask that cuts the last n ids out of ``key``), longest first
        self._slots = [(n, self.index[n], (1 << (32 * n)) - 1) for n in self.sizes]
        self.key = 0  # the last ``ngram`` ids packed (the lower 32 bits: the last id)
        top, keys = self.config.ngram, self.keys
        # match length -> decayed drafts kept after a match that long / tried (kept + first rejected);
        # lengths past ``ngram`` (a longest n-gram match extended backwards) start from a higher prior
        self.kept = {n: _prior(n, top) for n in keys}
        self.tried = dict.fromkeys(keys, 1.0)
        # n -> the best width for that estimate (expected tokens per cost rise then fall with the
        # width, so the best within a smaller limit is this one capped). Each n-gram size starts with
        # a two-draft probe (a longer match: wider): a wide pass is paid for once drafts were kept.
        most = self.config.max_draft
        self.best = {n: self.best_width(self.kept[n] / self.tried[n], most) for n in keys}
        self.width = 0  # the width of the last proposal
        self.last_n = self.sizes[0]  # the match length of the last proposal (an estimate's key)
        self.cooldown = 0
        self.misses = 0
        self.drafted = 0
        self.accepted = 0
        # text that copies nothing: after GIVE_UP_MISSES rounds with no draft kept, the request
        # takes plain steps without the drafter's per-token bookkeeping
        self.exhausted = False
        self.text.extend(int(tok) for tok in prompt)
        self.indexed = 0  # tokens of ``text`` whose preceding n-grams are in ``index``
        self._catch_up()  # the prompt now (before the prefill), the tokens generated at lookups

    def append(self, tok: int) -> None:
        """Record one token of the text (indexed at the next :meth:`propose`: a plain step, or a
        cooldown's, costs a list append)."""
        self.text.append(tok)

    def _catch_up(self) -> None:
        """Index the n-grams ending just before each token appended since the last call, so that
        a lookup of the n-gram ending the text finds an earlier occurrence, never itself."""
        text, key, mask = self.text, self.key, self._top_mask
        slots = self._slots
        for end in range(self.indexed, len(text)):
            for n, index, cut in slots:
                if end >= n:
                    index[key & cut] = end
            key = ((key << 32) | text[end]) & mask
        self.key, self.indexed = key, len(text)

    def propose(self, out: np.ndarray, limit: int) -> int:
        """Write up to ``limit`` drafts into ``out[1:]``; how many (0: none, or cooling down).

        The drafts are what followed the latest earlier occurrence of the longest n-gram ending
        the text; a match of ``ngram`` ids is extended backwards (up to ``ngram + LONG_MATCH``) to
        pick its estimate, since a longer match is far more often followed by the same text."""
        if self.cooldown > 0:
            self.cooldown -= 1
            return 0
        limit = min(limit, self.config.max_draft)
        if limit < 1:
            return 0
        if self.indexed < len(self.text):
            self._catch_up()
        text, key = self.text, self.key
        end = len(text)
        top = self.config.ngram
        for n, index, mask in self._slots:
            if end < n:
                continue
            at = index.get(key & mask)
            if at is None:
                continue
            m = n
            if n == top:  # how far the match reaches back, past the n-gram
                i, j, most = at - n - 1, end - n - 1, top + LONG_MATCH
                while m < most and i >= 0 and text[i] == text[j]:
                    m += 1
                    i -= 1
                    j -= 1
            # the tokens that followed the match (at < end always); at least one: a round that
            # keeps nothing starts a cooldown, which bounds how often a poor estimate is probed
            k = max(1, min(self.best[m], limit, end - at))
            for i in range(k):
                out[1 + i] = text[at + i]
            self.width, self.last_n = k, m
            return k
        return 0

    def best_width(self, rate: float, most: int) -> int:
        """The number of drafts (0..most) with the most expected tokens per unit of pass cost,
        when each draft is kept with probability ``rate`` once the ones before it were."""
        costs = self._table
        if costs is None or self._stale >= _REFRESH or len(costs) <= most:
            costs = self._table = self.costs(self.config.max_draft if most <= self.config.max_draft else most)
            self._stale = 0
        best_k, best, expected, p = 0, 1.0, 1.0, 1.0
        for k in range(1, most + 1):
            p *= rate
            expected += p
            gain = expected / costs[k]
            if gain > best:
                best_k, best = k, gain
        return best_k

    def feedback(self, drafted: int, accepted: int) -> None:
        """Update the kept-draft estimate of the last proposal's match length after a verify pass of
        ``drafted`` drafts of which ``accepted`` were kept; a round with none kept cools down."""
        self.drafted += drafted
        self.accepted += accepted
        n = self.last_n
        self.kept[n] = _DECAY * self.kept[n] + accepted
        self.tried[n] = _DECAY * self.tried[n] + accepted + (accepted < drafted)
        self.best[n] = self.best_width(self.kept[n] / self.tried[n], self.config.max_draft)
        if accepted == 0:
            self.misses += 1
            self.exhausted = self.accepted == 0 and self.misses >= GIVE_UP_MISSES
            self.cooldown = min(self.config.max_cooldown, 1 << min(self.misses - 1, 30))
        else:
            self.misses = 0


# ------------------------------------------------------------------------------------------------
# the graph: logits of the last few positions


def load_for_verify(spec: ModelSpec, width: int) -> tuple[bytes | str, bool]:
    """The model to hand to InferenceSession for speculation: the graph with its logits cut to the
    last ``width`` positions (serialized bytes), or the path itself when no edit applies."""
    model = spec.take_graph()
    path = str(spec.model_path)
    if model is None:
        model = onnx.load(path, load_external_data=False)
    if model.ByteSize() > 1_800_000_000:  # protobuf's 2 GB cap: leave big embedded-weight models alone
        return path, False
    if not slice_logits_to_last(model, spec.logits.name, width):
        return path, False
    return model.SerializeToString(), True


def logits_positions_pruned(session: object, logits_name: str) -> bool:
    """Whether the session's logits output is fixed at one position (an LM head pruned to the
    last token: no verify pass can get the drafts' logits)."""
    for out in session.get_outputs():  # type: ignore[attr-defined]
        if out.name == logits_name:
            shape = out.shape
            return len(shape) == 3 and shape[1] == 1
    return False

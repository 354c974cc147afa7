"""The decode loops: prefill, decode_one_token, and the loops that run a request to its end.

    one request:  generate_one        prefill -> sample -> [token rule -> decode_one_token -> sample]*
                  generate_one_speculative  the same, with drafts from the request's own text
                                      verified K at a time (engine/speculation.py)
                  generate_one_ahead  the same, one step ahead of the host (ids chosen on the device)
    a batch:      generate_batch      prefill_rows -> [rows' token rule -> decode_rows (+ joiners)]*
    groups:       run_requests        a list of requests in batches of max_batch, or one by one

Each loop is a generator: it yields a chunk per token as it is decoded and returns (single) or
yields with each row's last chunk (batch) the finished GenerationResult. ``RowOutput.push`` is the
one rule that ends a row (EOS, max tokens, stop string) and builds its text and logprobs.
Everything a step touches belongs to the engine's state and sampler; these functions know
nothing of threads or locks (engine/scheduler.py) and nothing of how requests are checked
(engine/request.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .config import KVLayout, ModelSpec
from .errors import EngineError
from .request import GenerationResult, GenerationStats, Request, StreamChunk
from .text import IncrementalDetokenizer

if TYPE_CHECKING:
    from .binding import StepState as CPUStepState
    from .prefix_cache import PrefixCache
    from .protocols import AheadSampler, BatchSampler, BatchStepState, Sampler, StepState
    from .speculation import PromptLookupDrafter
    from .tokenizer import Tokenizer

# a join source: (rows free to take, the batch's width now, take them out of the queue?) -> [(row, request)]
JoinSource = Callable[[list[int], int, bool], list[tuple[int, Request]]]
# what the batch loops yield per token: (row, its request, its chunk, its result on its last chunk else None)
RowEvent = tuple[int, Request, StreamChunk, "GenerationResult | None"]


@dataclass
class DecodeContext:
    """What every loop runs on: one engine's state, sampler and output buffer, made once at load."""

    spec: ModelSpec
    state: StepState
    sampler: Sampler
    out_ids: np.ndarray  # (max_batch, max_length) int64: each row's new token ids
    eos: frozenset[int]
    tokenizer: Tokenizer | None
    max_length: int
    max_batch: int
    lookahead: bool = True  # device samplers: run one step ahead of the host (False: a switch for measuring)
    drafter: PromptLookupDrafter | None = None  # set when the state runs verify passes (speculation)
    prefix: PrefixCache | None = None  # set when cache rows can be reused across requests (a record per row)

    @property
    def rope_switch(self) -> int | None:
        return self.spec.rope_switch_length


class RowOutput:
    """One row's tokens so far, its text and logprobs, and the rule that ends it."""

    def __init__(self, ctx: DecodeContext, row: int, req: Request, t0: float) -> None:
        self.ctx, self.row, self.req = ctx, row, req
        self.out = ctx.out_ids[row]  # (max_length,) view: its new ids
        self.n = 0
        self.finish = "length"
        self.done = False
        self.logprobs: list[float] | None = [] if req.params.logprobs is not None else None
        self.top: list[dict[int, float]] = []
        self.pieces: list[str] = []
        self.t0 = self.t_first = t0  # prefill start, first token
        self.cached = 0  # prompt positions reused from the previous request (prefix cache)
        self.drafted = self.accepted = 0  # speculation: drafts verified, drafts kept

    @property
    def ids(self) -> np.ndarray:
        return self.out[: self.n]

    def push(self, tok: int, sampler: Sampler) -> StreamChunk:
        """Record ``tok``; decide whether it ends the row (EOS, max_new_tokens, a stop string)."""
        req = self.req
        self.out[self.n] = tok
        self.n += 1
        last = self.n >= req.max_new_tokens
        if tok in self.ctx.eos:
            self.finish, last = "eos", True
        piece = ""
        if req.detok is not None:
            piece = req.detok.push(tok)
            if last:
                piece += req.detok.flush()
            if req.stop is not None:
                piece, stopped = req.stop.push(piece)
                if stopped:
                    self.finish, last = "stop", True
                elif last:
                    piece += req.stop.flush()
            self.pieces.append(piece)
        lp = None
        if self.logprobs is not None:
            lp = float(sampler.logprobs[self.row])
            self.logprobs.append(lp)
            k = req.params.logprobs or 0
            ids, values = sampler.top_ids[self.row, :k], sampler.top_logprobs[self.row, :k]
            self.top.append({int(i): float(v) for i, v in zip(ids, values, strict=True)})
        self.done = last
        return StreamChunk(piece, tok, self.finish if last else None, lp, self.top[-1] if lp is not None else None)

    def result(self, t_end: float) -> GenerationResult:
        """The finished row's text, ids and stats."""
        req, ctx = self.req, self.ctx
        new_ids = self.ids.tolist()
        if req.detok is not None:
            text = "".join(self.pieces)
        elif ctx.tokenizer is not None:
            text = IncrementalDetokenizer.continuation(ctx.tokenizer, req.prompt_ids.tolist(), new_ids)
        else:
            text = ""
        n, decode_s = len(new_ids), t_end - self.t_first
        stats = GenerationStats(
            prompt_tokens=int(req.prompt_ids.size),
            new_tokens=n,
            tokenize_s=req.tokenize_s,
            prefill_s=self.t_first - self.t0,
            ttft_s=self.t_first - req.t_start,
            decode_s=decode_s,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            total_s=t_end - req.t_start,
            kv_cache_bytes=ctx.state.kv_nbytes,
            drafted_tokens=self.drafted,
            accepted_tokens=self.accepted,
            cached_prompt_tokens=self.cached,
        )
        return GenerationResult(
            text=text,
            token_ids=new_ids,
            finish_reason=self.finish,
            stats=stats,
            prompt_ids=req.prompt_ids.tolist(),
            logprobs=self.logprobs,
            top_logprobs=self.top if self.logprobs is not None else None,
        )


# ------------------------------------------------------------------------------------------------
# one request


def prefill(ctx: DecodeContext, req: Request, cached: int = 0) -> Any:
    """One run over ``req``'s prompt on row 0 (over its first ``cached`` positions, left in the
    cache by the previous request, when > 0); returns its logits (1, vocab)."""
    if cached:
        return cast("CPUStepState", ctx.state).prefill_from(req.prompt_ids[None, :], cached)
    return ctx.state.prefill(req.prompt_ids[None, :])


def decode_one_token(ctx: DecodeContext, req: Request, row: RowOutput) -> Any:
    """Logits of the next position: one step, or a recomputed cache (a resumed stream, or the
    LongRoPE switch, where the whole cache is recomputed with the long-context factors)."""
    st = ctx.state
    if req.resume is not None:
        return _resume(ctx, req, row)
    if st.length == ctx.rope_switch:
        return st.prefill(np.concatenate((req.prompt_ids, row.ids))[None, :])
    return st.decode_one_token()


def generate_one(ctx: DecodeContext, req: Request, cached: int = 0) -> Generator[StreamChunk, None, GenerationResult]:
    """Prefill, then decode until the row ends; yields a chunk per token, returns the result.
    (The sampler is reset for ``req``: :func:`generate_single` does it.)"""
    st, sampler = ctx.state, ctx.sampler
    row = RowOutput(ctx, 0, req, time.perf_counter())
    row.cached = cached
    sampler.sample(prefill(ctx, req, cached), st.next_ids)
    row.t_first = time.perf_counter()
    yield from _plain_steps(ctx, req, row, int(st.host_ids[0]))
    return row.result(time.perf_counter())


def _plain_steps(ctx: DecodeContext, req: Request, row: RowOutput, tok: int) -> Generator[StreamChunk, None, None]:
    """Emit ``tok``, then one step per token until the row ends (the single-request loop's body;
    the speculative loop's too, once it stops drafting)."""
    st, sampler = ctx.state, ctx.sampler
    while True:
        yield row.push(tok, sampler)
        if row.done or req.cancelled:
            return
        sampler.sample(decode_one_token(ctx, req, row), st.next_ids)
        tok = int(st.host_ids[0])


def generate_one_ahead(ctx: DecodeContext, req: Request) -> Generator[StreamChunk, None, GenerationResult]:
    """:func:`generate_one` for a sampler that chooses the ids on the device: the step for token
    ``n + 1`` is enqueued before the host waits for token ``n``, so the device works while the
    host handles a token (stop checks, text, the caller's stream). The ids alternate between two
    page-locked slots. When token ``n`` ends the row the step enqueued after it is dropped: its KV
    row lies past the request's end and the next prompt overwrites it. The first token is waited
    for before step 1 is queued, so the time to first token includes no step launch."""
    st, sampler = ctx.state, cast("AheadSampler", ctx.sampler)
    limit = req.max_new_tokens
    row = RowOutput(ctx, 0, req, time.perf_counter())
    sampler.enqueue(prefill(ctx, req), st.next_ids, 0)
    tok = int(sampler.wait(0)[0])
    row.t_first = time.perf_counter()
    if limit > 1:
        sampler.enqueue(st.decode_one_token(), st.next_ids, 1)
    while True:
        yield row.push(tok, sampler)
        if row.done or req.cancelled:
            return row.result(time.perf_counter())
        if req.resume is not None:  # evicted while suspended: the step in flight was lost
            raise EngineError("this stream was evicted while suspended and the device loop cannot resume it")
        n = row.n
        if n + 1 < limit:  # token n + 1 may be wanted: enqueue its step now
            sampler.enqueue(st.decode_one_token(), st.next_ids, (n + 1) & 1)
        tok = int(sampler.wait(n & 1)[0])


def generate_one_speculative(
    ctx: DecodeContext, req: Request, cached: int = 0
) -> Generator[StreamChunk, None, GenerationResult]:
    """:func:`generate_one` with prompt-lookup drafts (engine/speculation.py): after each token the
    drafter proposes up to K tokens from the prompt and the text so far; one pass runs the pending
    token and the drafts, and each position is sampled in turn from its own logits, the drafts kept
    while they equal the token chosen. The first token that differs (or the one after the last
    draft) is the next pending token. Rejected positions are dropped by :meth:`rewind` (the
    share-buffer cache is overwritten later). Tokens go through :meth:`RowOutput.push` one at a
    time, so the row ends at the first one that ends it."""
    st, sampler = cast("CPUStepState", ctx.state), ctx.sampler
    drafter = cast("PromptLookupDrafter", ctx.drafter)
    ids, host = st.multi_ids[0], st.host_ids  # (width,) the verify pass's ids; (1,) the sampled id
    rows = [st.multi_logits[0, j : j + 1] for j in range(st.multi_width)]  # (1, vocab) views, one per position
    switch = ctx.rope_switch
    row = RowOutput(ctx, 0, req, time.perf_counter())
    row.cached = cached
    drafter.start(req.prompt_ids.tolist())
    sampler.sample(prefill(ctx, req, cached), st.next_ids)
    row.t_first = time.perf_counter()
    tok = int(host[0])
    plain = 0  # plain steps taken after a lookup found no match
    while True:
        yield row.push(tok, sampler)
        if row.done or req.cancelled:
            break
        drafter.append(tok)
        if req.resume is not None:  # evicted while suspended: recompute the cache, re-read the text
            tok = _resume_speculative(ctx, req, row)
            continue
        if drafter.cooldown:  # plain steps after a round that kept nothing: no lookup, no timing
            drafter.cooldown -= 1
            sampler.sample(decode_one_token(ctx, req, row), st.next_ids)
            tok = int(host[0])
            continue
        base = st.length  # cached positions; ``tok`` goes to position ``base``
        limit = req.max_new_tokens - row.n - 1  # drafts beyond it could not all be emitted
        if switch is not None and base <= switch:
            limit = min(limit, switch - base - 1)  # stay below a LongRoPE switch (decode_one_token recomputes there)
        t_round = time.perf_counter()
        k = drafter.propose(ids, limit)
        if k == 0:  # no match: a plain step, one in 4 timed (the pass costs that set the draft width)
            plain += 1
            if plain & 3 == 1:
                t0 = time.perf_counter()
                logits = decode_one_token(ctx, req, row)
                drafter.observe(1, time.perf_counter() - t0)
            else:
                logits = decode_one_token(ctx, req, row)
            sampler.sample(logits, st.next_ids)
            tok = int(host[0])
            continue
        ids[0] = tok
        t0 = time.perf_counter()
        st.decode_tokens(k + 1)  # logits after tok and after each draft, read through ``rows``
        pass_s = time.perf_counter() - t0
        drafter.observe(k + 1, pass_s)
        kept = 0
        for j in range(k + 1):
            sampler.sample(rows[j], st.next_ids)
            tok = int(host[0])
            if j == k or tok != ids[j + 1]:
                break
            kept += 1
            yield row.push(tok, sampler)
            drafter.append(tok)
            if row.done or req.cancelled or req.resume is not None:
                break
        if req.resume is None:  # (an evicted stream's cache is another request's now)
            st.rewind(base + 1 + kept)  # tok and the kept drafts stay cached
        drafter.feedback(k, kept)
        if kept == 0:  # (no token yielded in between) the round's host time beyond its pass
            drafter.observe_round(time.perf_counter() - t_round - pass_s)
        row.drafted += k
        row.accepted += kept
        if row.done or req.cancelled:
            break
        if req.resume is not None:  # evicted after a kept draft: the next token comes from a recomputed cache
            tok = _resume_speculative(ctx, req, row)
        if drafter.exhausted:  # the text copies nothing: plain steps for the rest of the request
            yield from _plain_steps(ctx, req, row, tok)
            break
    return row.result(time.perf_counter())


def _resume_speculative(ctx: DecodeContext, req: Request, row: RowOutput) -> int:
    """A speculative stream evicted while suspended: its next token from a recomputed cache
    (:func:`decode_one_token`), and the drafter, which served the request that evicted it, fed
    its own text again."""
    ctx.sampler.sample(decode_one_token(ctx, req, row), ctx.state.next_ids)
    cast("PromptLookupDrafter", ctx.drafter).start([*req.prompt_ids.tolist(), *row.ids.tolist()])
    return int(ctx.state.host_ids[0])


def generate_single(ctx: DecodeContext, req: Request) -> Generator[StreamChunk, None, GenerationResult]:
    """One request: the sampler reset for it, then the loop one step ahead when the sampler
    chooses the ids on the device (and no logprobs, no LongRoPE switch among its steps), the
    speculative loop when the request asks for it, else step by step. With a prefix cache the
    prompt's positions cached in row 0 are reused (another row holding more of them is swapped in
    first), and the record is put back when the request ends normally."""
    ctx.sampler.reset(req.params, [req.prompt_ids], checked=True)  # checked once, in engine/request.py
    switch, p = ctx.rope_switch, len(req.prompt_ids)
    if ctx.prefix is not None and req.prefix_cache:  # a batch row holding more of the prompt: swapped to row 0
        ctx.prefix.bring(cast("CPUStepState", ctx.state), req.prompt_ids, switch)
    cached = ctx.prefix.take(req.prompt_ids, switch, req.prefix_cache) if ctx.prefix is not None else 0
    # the decode steps run at lengths P .. P + max_new_tokens - 2; one at the switch re-prefills
    crosses = switch is not None and p <= switch <= p + req.max_new_tokens - 2
    if ctx.lookahead and ctx.sampler.on_device and req.params.logprobs is None and not crosses:
        return (yield from generate_one_ahead(ctx, req))
    if req.speculation is not None and ctx.drafter is not None:
        result = yield from generate_one_speculative(ctx, req, cached)
    else:
        result = yield from generate_one(ctx, req, cached)
    if ctx.prefix is not None:
        ctx.prefix.store(req.prompt_ids, result.token_ids, ctx.state.length)
    return result


def evict(ctx: DecodeContext, req: Request) -> None:
    """A suspended stream gives the engine up: keep what it needs to resume (its row's random
    state and its tokens so far, which the next request overwrites); its next step recomputes the
    cache from the prompt and those tokens."""
    req.resume = (ctx.sampler.save_row(0), ctx.out_ids[0].copy())


def _resume(ctx: DecodeContext, req: Request, row: RowOutput) -> Any:
    saved, out = req.resume
    req.resume = None
    if ctx.prefix is not None:
        ctx.prefix.clear()  # row 0 is rewritten below; the request that held it may have stored it
    if saved is None and not req.params.do_sample:
        saved = 0  # greedy rows draw nothing: any state will do
    if saved is None:
        raise EngineError("this stream was evicted while suspended and its sampler state cannot be restored")
    row.out[: row.n] = out[: row.n]
    ids = np.concatenate((req.prompt_ids, row.ids))
    ctx.sampler.reset(req.params, [ids], checked=True)  # penalty counts: prompt + tokens so far, as they were
    ctx.sampler.restore_row(0, saved)
    if ctx.spec.coarse_activations is None:
        return ctx.state.prefill(ids[None, :])
    return _replay(ctx, req.prompt_ids, row.ids)


def _replay(ctx: DecodeContext, prompt: np.ndarray, tokens: np.ndarray) -> Any:
    """Rebuild row 0's cache as a plain run built it: the prompt in one pass, then each token in a
    one-token step (a recompute at the LongRoPE switch where the run had one). For models whose
    matmuls round activations coarsely (engine/config.py coarse_activations), where one pass over
    the tokens would give their keys and values other roundings and could change later tokens."""
    st, switch = ctx.state, ctx.rope_switch
    logits = st.prefill(prompt[None, :])
    for i, tok in enumerate(tokens.tolist()):
        if st.length == switch:
            logits = st.prefill(np.concatenate((prompt, tokens[: i + 1]))[None, :])
        else:
            st.next_ids[0] = tok
            logits = st.decode_one_token()
    return logits


def run_to_end(loop: Generator[Any, None, GenerationResult]) -> GenerationResult:
    """Drain a single-request loop; its result."""
    while True:
        try:
            next(loop)
        except StopIteration as e:
            return cast(GenerationResult, e.value)


# ------------------------------------------------------------------------------------------------
# batches


def can_batch(ctx: DecodeContext, reqs: list[Request]) -> bool:
    """Whether ``reqs`` can share forward passes (else they run one by one, with the same results)."""
    if len(reqs) < 2 or ctx.state.packed_mask is None:
        return False
    if ctx.spec.layout is not KVLayout.GQA_SHARED and ctx.spec.position_ids is None:
        # a growing-cache model without position_ids takes positions from the past length,
        # which left padding would shift for every row shorter than the longest
        return False
    # left padding: the batch is as long as its longest prompt plus its longest generation
    end = max(r.prompt_ids.size for r in reqs) + max(r.max_new_tokens for r in reqs)
    switch = ctx.rope_switch  # a LongRoPE switch applies to the whole batch at once: stay below it
    return end <= ctx.max_length and (switch is None or end <= switch)


def can_join_batch(ctx: DecodeContext, group: list[Request]) -> bool:
    """Whether a group can run as a batch that other requests join while it runs (share-buffer GQA)."""
    if ctx.spec.layout is not KVLayout.GQA_SHARED or ctx.state.packed_mask is None:
        return False
    if len(group) > 1:
        return can_batch(ctx, group)
    switch, r = ctx.rope_switch, group[0]
    return switch is None or r.prompt_ids.size + r.max_new_tokens <= switch


def fits_join(ctx: DecodeContext, req: Request, width: int) -> bool:
    """Whether ``req`` can join a running batch now at ``width`` (its prompt fits the mask, and its
    last step stays within max_length and below a LongRoPE switch)."""
    end = width + req.max_new_tokens - 1  # the width when its last token is decoded
    switch = ctx.rope_switch
    return req.prompt_ids.size <= width and end <= ctx.max_length and (switch is None or end <= switch)


def generate_batch(ctx: DecodeContext, reqs: list[Request], joins: JoinSource | None = None) -> Iterator[RowEvent]:
    """Prefill ``reqs`` together, then decode them one forward pass per step until every row has
    ended; an ended (or cancelled) row is masked from the next step on. Yields ``(row, chunk,
    request, chunk, result)`` per token, ``result`` set on the row's last token.

    ``joins`` (share-buffer GQA caches): between steps, requests it hands over join on ended
    rows or new ones; they are appended to ``reqs``.

    With a prefix cache, row ``b`` takes its record when a request starts or joins on it (a
    prefix-cache request reuses the cached part of its prompt) and stores it as the row ends."""
    st, sampler = cast("BatchStepState", ctx.state), cast("BatchSampler", ctx.sampler)
    finished, host_ids = st.finished, st.host_ids
    n, prefix, switch = len(reqs), ctx.prefix, ctx.rope_switch
    sampler.reset([r.params for r in reqs], [r.prompt_ids for r in reqs], checked=True)
    t0 = time.perf_counter()
    prompts, steps = [r.prompt_ids for r in reqs], max(r.max_new_tokens for r in reqs) - 1
    if prefix is not None:  # CPU share-buffer state: rows reuse their own cached prefixes
        starts = [prefix.take(r.prompt_ids, switch, r.prefix_cache, b) for b, r in enumerate(reqs)]
    else:
        starts = [0] * n
    logits = st.prefill_rows(prompts, steps, starts)
    sampler.sample(logits, st.next_ids, n)
    t_first = time.perf_counter()
    rows = [RowOutput(ctx, b, r, t0) for b, r in enumerate(reqs)]
    for row, cached in zip(rows, starts, strict=True):
        row.t_first, row.cached = t_first, cached
    live = n
    while True:
        for b in range(n):
            row = rows[b]
            if finished[b]:
                continue
            if row.req.cancelled:  # its caller left: stop the row, no result
                finished[b] = 1
                live -= 1
                _store_row(ctx, row)
                continue
            chunk = row.push(int(host_ids[b]), sampler)
            if row.done:
                finished[b] = 1  # masked from the next step on
                live -= 1
                _store_row(ctx, row)
            yield b, row.req, chunk, row.result(time.perf_counter()) if row.done else None
        if not live and not (joins and joins(_free_rows(ctx, finished, n), st.length + 1, False)):
            return
        logits = st.decode_rows()
        joiners = joins(_free_rows(ctx, finished, n), st.length, True) if joins else []
        t_join = time.perf_counter()
        for b, req in joiners:
            reqs.append(req)
            cached = prefix.take(req.prompt_ids, switch, req.prefix_cache, b) if prefix is not None else 0
            st.join_row(b, req.prompt_ids, req.max_new_tokens - 1, cached)
            sampler.reset_row(b, req.params, req.prompt_ids, checked=True)
            if b == n:
                n += 1
                rows.append(RowOutput(ctx, b, req, t_join))
            else:
                rows[b] = RowOutput(ctx, b, req, t_join)
            rows[b].cached = cached
            live += 1
        sampler.sample(logits, st.next_ids, n)
        t_sampled = time.perf_counter()
        for b, _ in joiners:
            rows[b].t_first = t_sampled


def _store_row(ctx: DecodeContext, row: RowOutput) -> None:
    """A batch row has ended: with a prefix cache its record is its prompt and tokens, less the
    last slot, which the batch's later masked steps rewrite."""
    if ctx.prefix is not None:
        lengths = cast("CPUStepState", ctx.state).lengths
        ctx.prefix.store(row.req.prompt_ids, row.ids, int(lengths[row.row]) - 1, row.row)


def _free_rows(ctx: DecodeContext, finished: np.ndarray, n: int) -> list[int]:
    """Rows a joiner may take: ended rows of the batch, then new ones up to max_batch."""
    return [b for b in range(n) if finished[b]] + list(range(n, ctx.max_batch))


def run_requests(ctx: DecodeContext, reqs: list[Request]) -> Iterator[RowEvent]:
    """Run ``reqs`` in groups of ``max_batch`` (batched when they can share passes, else one by
    one); yields ``(index in reqs, request, chunk, result)`` per token."""
    for start in range(0, len(reqs), ctx.max_batch):
        group = reqs[start : start + ctx.max_batch]
        if can_batch(ctx, group):
            for b, req, chunk, result in generate_batch(ctx, group):
                yield start + b, req, chunk, result
            continue
        for i, req in enumerate(group):
            if req.cancelled:
                continue
            loop = generate_single(ctx, req)
            while True:
                try:
                    chunk = next(loop)
                except StopIteration:
                    break  # the result went out with the last chunk, or the request was cancelled
                yield start + i, req, chunk, run_to_end(loop) if chunk.finish_reason is not None else None

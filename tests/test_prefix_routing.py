"""Prefix cache per batch row and routing in the auto_batch worker (engine/prefix_cache.py,
StepState.prefill_rows/join_row with cached offsets, AutoBatcher._place/_join_rows).

Every answer is compared with a cold engine's (one request at a time, no cache reuse). Routing is
checked deterministically by driving generate_batch and the worker's join source directly; the
threaded conversations check exactness and that every later turn reused its conversation.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

import engine
from engine.decode import generate_batch
from engine.prefix_cache import PrefixCache
from engine.request import GenerationResult, Request
from engine.scheduler import AutoBatcher, EngineLock, Ticket
from engine.testing.synthetic import SyntheticSpec, cached_model

TIMEOUT_S = 120  # a bound on every wait in this file; the tests take seconds


@pytest.fixture(scope="module")
def synthetic_gqa(tmp_path_factory):
    return cached_model(SyntheticSpec(layout="gqa", seed=21), tmp_path_factory.mktemp("routing"))


def _engines(model, **kw):
    warm = engine.Engine(model, max_length=256, prefix_cache=True, **kw)
    cold = engine.Engine(model, max_length=256)
    warm.eos_token_ids = cold.eos_token_ids = frozenset()  # lengths as asked: the records' sizes are known
    return warm, cold


def _req(eng: engine.Engine, ids: list[int], new: int, **sampling) -> Request:
    return eng._requests.one(ids, new, None, sampling, text=False)


def _cold(cold: engine.Engine, ids: list[int], new: int) -> list[int]:
    return cold.generate(ids, new).token_ids


# ------------------------------------------------------------------------------------------------
# records


def test_per_row_record_rules():
    rec = PrefixCache(32, rows=2)
    rec.store(np.array([1, 2, 3]), [4, 5], 4, row=1)
    assert rec.held(1) == 4 and rec.held(0) == 0 and rec.length == 0
    assert rec.peek(np.array([1, 2, 3, 4, 9]), None, row=1) == 4
    assert rec.peek(np.array([1, 2, 3, 4, 9]), None, row=0) == 0
    rec.store(np.array([7, 8, 9]), [1], 2, row=3)  # a row beyond those made: added; a batch row's length < P
    assert rec.held(3) == 2 and rec.peek(np.array([7, 8, 6]), None, row=3) == 2
    rec.swap(1, 3)
    assert rec.held(1) == 2 and rec.held(3) == 4 and rec.peek(np.array([1, 2, 3, 4, 9]), None, row=3) == 4
    assert rec.take(np.array([1, 2, 3, 4, 9]), None, row=3) == 4 and rec.held(3) == 0  # taken: cleared
    rec.clear(1)
    assert rec.held(1) == 0
    with pytest.raises(ValueError):
        rec.store(np.array([1, 2]), [], 1, row=-1)


def test_route_prefers_the_longest_prefix_and_keeps_held_rows_from_short_matches():
    rec = PrefixCache(64, rows=4)
    rec.store(np.arange(1, 21), [], 20, row=0)  # conversation A: 20 positions
    rec.store(np.array([1, 50, 51, 52]), [], 4, row=2)  # conversation B: 4 positions
    a_next = np.arange(1, 30)
    b_next = np.array([1, 50, 51, 52, 53, 54])
    new = np.array([1, 90, 91])  # shares only the first id with both
    got = rec.route([new, b_next, a_next, None], [0, 1, 2, 3], None)
    assert got == {2: (0, 20), 1: (2, 4)}  # the new conversation takes neither held row
    # two requests wanting one row: the longer match wins it
    assert rec.route([np.arange(1, 8), a_next], [0, 1], None) == {1: (0, 20)}
    assert rec.route([a_next], [1, 2, 3], None) == {}  # A's row is not free


def test_multi_token_only_rows_keep_the_prompt_alone():
    rec = PrefixCache(64, multi_token_only=True, rows=4)
    prompt = np.arange(10, 20, dtype=np.int64)
    rec.store(prompt, [7, 8, 9], 11, row=2)  # a batch row: prompt + tokens of one-token steps
    assert rec.held(2) == 10
    rec.store(prompt, [7], 9, row=1)  # a row that ended at its first token: its last slot left out
    assert rec.held(1) == 9
    assert rec.peek(np.concatenate((prompt, [7])), None, row=2) == 9  # the suffix pass runs two tokens


def test_step_state_refuses_offsets_and_swaps_that_do_not_fit(stories260k):
    eng = engine.Engine(stories260k, max_batch=2)
    try:
        st, p = eng._state, np.array([1, 5, 6, 7], np.int64)
        with pytest.raises(ValueError, match="starts"):
            st.prefill_rows([p, p], 3, [0, 4])  # a whole prompt cached: its last position must run
        with pytest.raises(ValueError, match="starts"):
            st.prefill_rows([p, p], 3, [0])
        with pytest.raises(ValueError, match="cannot swap"):
            st.swap_rows(0, 2, 4)
        st.prefill_rows([p, p[:3]], 3)
        st.decode_rows()
        st.finished[1] = 1
        with pytest.raises(ValueError, match="cached positions"):
            st.join_row(1, p[:3], 2, start=3)
    finally:
        eng.close()


# ------------------------------------------------------------------------------------------------
# batches keep and reuse their rows


@pytest.mark.parametrize("which", ["stories260k", "synthetic_gqa"])
def test_batch_rows_are_kept_and_reused_by_the_next_batch(request, which):
    warm, cold = _engines(request.getfixturevalue(which), max_batch=4)
    try:
        rng = np.random.default_rng(3)
        prompts = [[1, *rng.integers(3, 300, k).tolist()] for k in (5, 9, 9, 14)]
        news = [8, 12, 5, 20]
        first = warm.generate(prompts, news)
        prefix = warm._ctx.prefix
        for b, r in enumerate(first):
            assert r.token_ids == _cold(cold, prompts[b], news[b])
            # prompt + the tokens whose KV the row wrote, less its last slot (rewritten by later masked steps)
            held = len(r.prompt_ids) + len(r.token_ids) - 2
            assert prefix.held(b) == held
            assert prefix.ids[b, :held].tolist() == (r.prompt_ids + r.token_ids)[:held]
        turns = [r.prompt_ids + r.token_ids + rng.integers(3, 300, 3).tolist() for r in first]
        again = warm.generate(turns, [6, 3, 9, 4])
        for b, r in enumerate(again):
            assert r.stats.cached_prompt_tokens == len(first[b].prompt_ids) + len(first[b].token_ids) - 2
            assert r.token_ids == _cold(cold, turns[b], [6, 3, 9, 4][b])
        # rows given other prompts (Engine.generate does not route) reuse only the BOS they share
        other = warm.generate([[1, 299, 298, 297], turns[0]], 5)
        assert other[0].stats.cached_prompt_tokens == 1 and other[1].stats.cached_prompt_tokens == 1
        assert other[0].token_ids == _cold(cold, [1, 299, 298, 297], 5)
        assert other[1].token_ids == _cold(cold, turns[0], 5)
    finally:
        warm.close()
        cold.close()


def _run(
    eng: engine.Engine, reqs: list[Request], joins=None, on_result=None
) -> dict[int, tuple[int, GenerationResult]]:
    """generate_batch to its end with the engine held: {id(request): (row, result)}."""
    out: dict[int, tuple[int, GenerationResult]] = {}

    def body() -> None:
        for b, req, _, result in generate_batch(eng._ctx, reqs):
            if result is not None:
                out[id(req)] = (b, result)

    eng._lock.run(body)
    return out


@pytest.mark.parametrize("which", ["stories260k", "synthetic_gqa"])
def test_routing_places_and_joins_requests_on_their_rows(request, which):
    """The worker's placement of a new batch and its join source, driven without threads: each
    conversation's next turn lands on (or has swapped into) the row holding it, reuses it, and
    answers as a cold engine does."""
    warm, cold = _engines(request.getfixturevalue(which), max_batch=4)
    try:
        rng = np.random.default_rng(5)
        prompts = [[1, *rng.integers(3, 300, k).tolist()] for k in (4, 5, 24, 6)]
        first = warm.generate(prompts, 4)  # rows 0..3 hold conversations c0..c3
        convs = [r.prompt_ids + r.token_ids for r in first]
        prefix = warm._ctx.prefix
        batcher = AutoBatcher(EngineLock(), warm._ctx)

        def turn(c: int, extra: int = 2) -> list[int]:
            return convs[c] + rng.integers(3, 300, extra).tolist()

        # a new batch of two: c0's turn stays on row 0, c2's held row (2) is swapped into row 1
        t0, t2 = turn(0), turn(2)
        r0, r2 = _req(warm, t0, 3), _req(warm, t2, 40)
        held_c1 = prefix.held(1)
        placed = batcher._place([r2, r0])
        assert placed == [r0, r2]
        assert prefix.peek(r2.prompt_ids, None, 1) == len(convs[2]) - 2  # c2's KV and record now on row 1
        assert prefix.held(2) == held_c1 and prefix.ids[2, :held_c1].tolist() == convs[1][:held_c1]  # c1 on row 2

        group = [Ticket(r0), Ticket(r2)]
        joins = batcher._joins(group, {id(t.request): t for t in group})
        late: dict[str, Request] = {}
        out: dict[int, tuple[int, GenerationResult]] = {}

        def body() -> None:
            for b, req, _, result in generate_batch(warm._ctx, placed, joins):
                if result is None:
                    continue
                out[id(req)] = (b, result)
                if req is r0:  # row 0 has stopped: queue c0's next turn, c1's (on row 2) and c3's (row 3)
                    convs[0] = t0 + result.token_ids
                    late.update(c0=_req(warm, turn(0), 5), c1=_req(warm, turn(1), 5), c3=_req(warm, turn(3), 5))
                    batcher._queue.extend(Ticket(late[k]) for k in ("c3", "c1", "c0"))

        warm._lock.run(body)
        assert not batcher._queue  # every late turn joined the running batch
        rows = {k: out[id(r)][0] for k, r in late.items()}
        assert rows == {"c0": 0, "c1": 2, "c3": 3}  # c0 on its stopped row; c1, c3 grew the batch onto theirs
        for req in (r0, r2, *late.values()):
            b, res = out[id(req)]
            assert res.token_ids == _cold(cold, req.prompt_ids.tolist(), req.max_new_tokens), b
            assert res.stats.cached_prompt_tokens > 0
        assert out[id(late["c1"])][1].stats.cached_prompt_tokens == held_c1
        assert out[id(late["c3"])][1].stats.cached_prompt_tokens == len(convs[3]) - 2
    finally:
        warm.close()
        cold.close()


def test_a_new_conversation_keeps_a_held_row_by_swapping_it_out(stories260k):
    """A request that reuses nothing takes a row whose conversation is first swapped out to an
    unused row holding less, so that conversation's next turn still finds it."""
    warm, cold = _engines(stories260k, max_batch=4)
    try:
        a = warm.generate([1, 40, 41, 42, 43, 44, 45], 6)  # the single path: conversation A on row 0
        assert warm._ctx.prefix.held(0) == 12
        batcher = AutoBatcher(EngineLock(), warm._ctx)
        fresh = _req(warm, [1, 80, 81, 82], 4)
        assert batcher._place([fresh]) == [fresh]
        assert warm._ctx.prefix.held(0) == 0 and warm._ctx.prefix.held(1) == 12  # A moved to row 1
        out = _run(warm, [fresh])
        assert out[id(fresh)][1].token_ids == _cold(cold, [1, 80, 81, 82], 4)
        nxt = _req(warm, [*a.prompt_ids, *a.token_ids, 7, 8], 6)
        placed = batcher._place([nxt])
        assert placed == [nxt] and warm._ctx.prefix.peek(nxt.prompt_ids, None, 0) == 12  # swapped back in
        res = _run(warm, placed)[id(nxt)][1]
        assert res.stats.cached_prompt_tokens == 12
        assert res.token_ids == _cold(cold, nxt.prompt_ids.tolist(), 6)
    finally:
        warm.close()
        cold.close()


def test_a_single_request_swaps_the_row_holding_its_prefix_into_row_zero(stories260k):
    """Without auto_batch a single request runs on row 0: a batch row holding more of its prompt
    is swapped in first (row 0's record moving to that row), so both conversations stay reusable."""
    warm, cold = _engines(stories260k, max_batch=4)
    try:
        a, b = warm.generate([[1, 20, 21, 22, 23], [1, 70, 71, 72, 73, 74, 75]], [6, 9])
        a_ids, b_ids = [*a.prompt_ids, *a.token_ids, 4], [*b.prompt_ids, *b.token_ids, 4]
        got_b = warm.generate(b_ids, 5)
        assert got_b.stats.cached_prompt_tokens == len(b_ids) - 3  # row 1's record, less its last slot
        assert got_b.token_ids == _cold(cold, b_ids, 5)
        assert warm._ctx.prefix.held(1) == len(a_ids) - 3  # conversation a moved to row 1
        got_a = warm.generate(a_ids, 5)
        assert got_a.stats.cached_prompt_tokens == len(a_ids) - 3
        assert got_a.token_ids == _cold(cold, a_ids, 5)
        off = warm.generate(b_ids, 5, prefix_cache=False)  # no reuse asked: nothing moves, nothing reused
        assert off.stats.cached_prompt_tokens == 0 and off.token_ids == got_b.token_ids
    finally:
        warm.close()
        cold.close()


# ------------------------------------------------------------------------------------------------
# invalidation


def test_a_failing_batch_leaves_its_running_rows_without_records(stories260k, monkeypatch):
    warm, cold = _engines(stories260k, max_batch=4)
    try:
        prompts = [[1, 20, 21, 22], [1, 30, 31, 32, 33], [1, 50, 51]]
        first = warm.generate(prompts, [3, 12, 12])
        convs = [r.prompt_ids + r.token_ids for r in first]
        prefix, st = warm._ctx.prefix, warm._state
        turns = [[*c, 9, 9] for c in convs]
        reqs = [_req(warm, t, n) for t, n in zip(turns, [2, 20, 20], strict=True)]
        steps = 0
        decode_rows = st.decode_rows

        def failing():
            nonlocal steps
            steps += 1
            if steps == 4:  # row 0 has ended (2 tokens); rows 1 and 2 are running
                raise RuntimeError("step failed")
            return decode_rows()

        monkeypatch.setattr(st, "decode_rows", failing)
        with pytest.raises(RuntimeError, match="step failed"):
            _run(warm, reqs)
        monkeypatch.undo()
        assert prefix.held(1) == 0 and prefix.held(2) == 0  # rewritten midway: nothing kept
        assert prefix.held(0) == len(turns[0]) + 2 - 2  # ended before the failure: kept
        again = warm.generate([[*turns[0], 3], *turns[1:]], 6)
        assert again[0].stats.cached_prompt_tokens == len(turns[0])
        assert [r.stats.cached_prompt_tokens for r in again[1:]] == [0, 0]
        for r in again:
            assert r.token_ids == _cold(cold, r.prompt_ids, 6)
    finally:
        warm.close()
        cold.close()


def test_batch_rows_never_reuse_keys_of_the_other_longrope_factors(stories260k, monkeypatch):
    """A row whose keys were rotated with the long factors (a single request past the switch on
    row 0) serves no batch row: batches stay below the switch."""
    warm, cold = _engines(stories260k, max_batch=2)
    try:
        prompt = [1, *range(40, 52)]
        switch = len(prompt) + 5
        for e in (warm, cold):
            monkeypatch.setattr(e, "spec", dataclasses.replace(e.spec, rope_switch_length=switch))
        long = warm.generate(prompt, 12)  # crosses the switch: row 0 ends with long-factor keys
        assert warm._ctx.prefix.held(0) > switch
        turn = [*prompt, *long.token_ids[:3]]
        got = warm.generate([turn, [1, 7, 8]], 2)  # a batch below the switch: row 0 reuses nothing
        assert got[0].stats.cached_prompt_tokens == 0
        assert got[0].token_ids == _cold(cold, turn, 2)
        again = warm.generate([[*turn, *got[0].token_ids[:1], 5], [1, 7, 8]], 2)  # row 0 is short-factor now
        assert again[0].stats.cached_prompt_tokens == len(turn)
        assert again[0].token_ids == _cold(cold, [*turn, *got[0].token_ids[:1], 5], 2)
    finally:
        warm.close()
        cold.close()


def test_auto_batch_failure_reruns_exactly_and_keeps_nothing_stale(stories260k, monkeypatch):
    """A batch failing mid-way through auto_batch: its request reruns alone (row 0, nothing reused:
    the batch took the row's record), the answer is a cold engine's, and the next turn reuses
    the rerun's row."""
    warm, cold = _engines(stories260k, max_batch=4, auto_batch=True)
    try:
        first = warm.generate([1, 60, 61, 62, 63], 8)
        ids = [*first.prompt_ids, *first.token_ids, 5, 6]
        st, decode_rows = warm._state, warm._state.decode_rows
        failed = threading.Event()

        def failing():
            if not failed.is_set():
                failed.set()
                raise RuntimeError("step failed")
            return decode_rows()

        monkeypatch.setattr(st, "decode_rows", failing)
        second = warm.generate(ids, 8)
        assert failed.is_set()
        assert second.stats.cached_prompt_tokens == 0 and second.token_ids == _cold(cold, ids, 8)
        ids = [*ids, *second.token_ids, 7]
        third = warm.generate(ids, 8)
        assert third.stats.cached_prompt_tokens == len(ids) - 2  # the rerun's row 0: prompt + 7 of its tokens
        assert third.token_ids == _cold(cold, ids, 8)
    finally:
        warm.close()
        cold.close()


# ------------------------------------------------------------------------------------------------
# conversations from several client threads through auto_batch


@pytest.mark.parametrize("which", ["stories260k", "synthetic_gqa"])
def test_threaded_conversations_reuse_their_rows_and_match_a_cold_engine(request, which):
    """Three clients, four turns each, through Engine(auto_batch=True, max_batch=4): however the
    requests meet in batches, every answer equals a cold engine's, and every later turn reuses
    its whole conversation so far (its row is routed to it: no other conversation shares more
    than the BOS, and new conversations keep held rows by swapping them out)."""
    warm, cold = _engines(request.getfixturevalue(which), max_batch=4, auto_batch=True)
    clients, turns = 3, 4
    log: dict[int, list[tuple[list[int], GenerationResult]]] = {k: [] for k in range(clients)}
    errors: list[BaseException] = []
    go = threading.Event()

    def client(k: int) -> None:
        try:
            rng = np.random.default_rng(100 + k)
            ids = [1, *rng.integers(3, 300, 4 + 3 * k).tolist()]
            assert go.wait(TIMEOUT_S)
            for _ in range(turns):
                res = warm.generate(ids, int(rng.integers(6, 14)))
                log[k].append((ids, res))
                ids = [*ids, *res.token_ids, *rng.integers(3, 300, 3).tolist()]
        except BaseException as e:  # re-raised by the main thread below
            errors.append(e)

    try:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join(TIMEOUT_S)
            assert not t.is_alive()
        assert not errors, errors
        for k in range(clients):
            assert len(log[k]) == turns
            for t, (ids, res) in enumerate(log[k]):
                assert res.token_ids == _cold(cold, ids, len(res.token_ids)), (k, t)
                if t:
                    prev_ids, prev = log[k][t - 1]
                    # the batch row held the previous prompt and answer, less its last two positions
                    assert res.stats.cached_prompt_tokens == len(prev_ids) + len(prev.token_ids) - 2, (k, t)
    finally:
        warm.close()
        cold.close()


# ------------------------------------------------------------------------------------------------
# coarse activation rounding (MatMulNBits accuracy_level 4): batch rows reuse their prompts only


@pytest.mark.slow
def test_int8_activation_batch_rows_reuse_only_their_prompts(int4_acc4):
    """On an accuracy-level-4 INT4 model a batch row's record keeps its prompt alone (its tokens
    came from one-token steps, whose KV rounds otherwise): each turn's batch equals a cold
    engine's same batch token for token, reusing exactly the previous prompts. (A batch is
    compared with a batch: one-token steps of several rows round differently from one row's.)"""
    warm = engine.Engine(int4_acc4, max_length=512, max_batch=2, prefix_cache=True)
    cold = engine.Engine(int4_acc4, max_length=512, max_batch=2)
    try:
        assert warm._ctx.prefix is not None and warm._ctx.prefix.multi_token_only
        warm.eos_token_ids = cold.eos_token_ids = frozenset()
        rng = np.random.default_rng(12)
        convs = [rng.integers(3, 4096, 12).tolist(), rng.integers(3, 4096, 17).tolist()]
        prev = [0, 0]  # the previous turn's prompt lengths
        for turn in range(4):
            got = warm.generate(convs, 24)
            want = cold.generate(convs, 24)
            assert [r.token_ids for r in got] == [r.token_ids for r in want], f"turn {turn}"
            for b, r in enumerate(got):
                assert r.stats.cached_prompt_tokens == prev[b], (turn, b)
                assert warm._ctx.prefix.held(b) == len(convs[b])
            prev = [len(c) for c in convs]
            convs = [[*c, *r.token_ids, *rng.integers(3, 4096, 5).tolist()] for c, r in zip(convs, got, strict=True)]
    finally:
        warm.close()
        cold.close()


def test_stale_conversations_give_their_rows_to_new_ones(stories260k):
    """Three conversations fill rows 0-2 and stop; three new ones then take turns. A new
    conversation takes the row whose record is the least recently stored, so from their second
    turn on each reuses its own conversation (the old rows held more, and a rule by size kept
    them pinned: every new turn reused nothing). Answers equal a cold engine's."""
    warm = engine.Engine(stories260k, max_length=512, max_batch=4, auto_batch=True, prefix_cache=True)
    cold = engine.Engine(stories260k, max_length=512)
    warm.eos_token_ids = cold.eos_token_ids = frozenset()
    try:
        for rep in range(2):
            rng = np.random.default_rng(rep)
            ids: list[list[int]] = [[], [], []]
            for turn in range(4):
                for k in range(3):
                    prompt = ids[k] + rng.integers(3, 500, 12).tolist()
                    res = warm.generate(prompt, 12)
                    assert res.token_ids == cold.generate(prompt, 12).token_ids, (rep, turn, k)
                    if turn:
                        # the row held the previous prompt and answer, less its last two positions
                        assert res.stats.cached_prompt_tokens == len(ids[k]) - 2, (rep, turn, k)
                    ids[k] = prompt + res.token_ids
    finally:
        warm.close()
        cold.close()

"""Who runs the engine when: the engine lock, streams' leases, and the auto_batch worker.

One engine runs one request, batch or stream chunk at a time. ``EngineLock.run`` holds it for a
whole request; a stream holds it only while a chunk is computed and keeps a *lease* between
chunks, so that its KV rows stay its own. A lease gives way (the stream is evicted, and resumes
later by recomputing its cache) when the engine is wanted by the thread that last advanced the
stream (that thread cannot be advancing it: left in an exception, or the same thread asking for
something else), when the stream has sat idle for ``STREAM_IDLE_S`` while others wait, or when
its Stream object is collected.

Interrupt safety: a Ctrl-C lands at the next bytecode that checks for signals, which in CPython
is after a call returns. So the mutex is only ever taken with ``with self._mutex:`` (its
``__enter__`` is C code and the with block is protected from the instruction after it), every
piece of bookkeeping happens inside that block or inside a ``try`` whose ``finally`` undoes it,
and waits are timed acquires of plain locks (an interrupted acquire holds nothing). No
``threading.Condition`` is used: its Python-level wait/notify bookkeeping is not interrupt-safe.

The auto_batch worker (``AutoBatcher``) takes queued requests, oldest first, and runs them as a
batch that later requests join between decode steps; every caller waits for its own ticket. With
a prefix cache it routes: a prefix-cache request starts or joins on the free row holding its
longest cached prefix (engine/prefix_cache.py), and rows' records are kept from requests that
reuse nothing there where an unused row can take them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Generic, TypeVar, cast

from .decode import (
    DecodeContext,
    JoinSource,
    can_join_batch,
    fits_join,
    generate_batch,
    generate_single,
    run_requests,
    run_to_end,
)
from .errors import EngineError, InvalidRequestError
from .request import GenerationResult, Request, StreamChunk

if TYPE_CHECKING:
    from .binding import StepState

_log = logging.getLogger("engine")
CLOSED = "this Engine is closed; create a new one"
STREAM_IDLE_S = 2.0  # a stream suspended this long gives the engine to a waiting caller
_POLL_S = 0.05  # waits re-check their condition this often (a missed wake-up costs at most this)
WORKER_LINGER_S = 0.02  # an idle auto_batch worker waits this long for more requests before it leaves

T = TypeVar("T")


class Lease:
    """A stream's claim on the engine between its chunks."""

    def __init__(self, on_evict: Callable[[], None]) -> None:
        self.on_evict = on_evict  # called (engine held) when another caller takes the engine
        self.thread: int | None = None  # the thread that last advanced the stream
        self.since = time.monotonic()  # when it was last suspended
        self.abandoned = False  # the stream object was collected or closed
        self._gone = threading.Lock()  # held while the lease holds the engine: waiters block on it
        self._gone.acquire()

    def evictable_by(self, ident: int) -> bool:
        return self.abandoned or ident == self.thread or time.monotonic() - self.since > STREAM_IDLE_S

    def wait(self, timeout: float) -> None:
        """Block until the lease ends (or ``timeout``)."""
        gone = self._gone
        if gone.acquire(timeout=timeout):
            gone.release()

    def end(self) -> None:
        """Wake the waiters; a lease taken again later gets a fresh gate."""
        gone, self._gone = self._gone, threading.Lock()
        self._gone.acquire()
        if gone.locked():
            gone.release()


class EngineLock:
    """Mutual exclusion for one engine, interrupt-safe, with leases for streams (module docstring)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()  # held while a request, a batch or one stream chunk runs
        self._lease: Lease | None = None  # the suspended stream that owns the KV rows now
        self._waiting: list[object] = []  # callers (not the worker) waiting for the engine
        self.closing = False  # close() is waiting: the auto_batch worker lets the engine go
        self.closed = False

    @property
    def contended(self) -> bool:
        """Whether a caller (other than the auto_batch worker) or close() waits for the engine."""
        return bool(self._waiting) or self.closing

    def run(self, fn: Callable[[], T], *, count: bool = True) -> T:
        """``fn()`` with the engine held (a suspended stream's lease is waited for or evicted).
        ``count``: the caller counts as waiting, so that the auto_batch worker makes way."""
        token = object()
        try:
            if count:
                self._waiting.append(token)
            while True:
                with self._mutex:
                    lease = self._take(None)
                    if lease is None:
                        if count:
                            self._waiting.remove(token)
                        return fn()
                lease.wait(_POLL_S)
        finally:
            if count:
                try:  # noqa: SIM105 -- contextlib.suppress enters in Python code: an interrupt there skips the remove
                    self._waiting.remove(token)
                except ValueError:
                    pass

    def step(self, lease: Lease, fn: Callable[[], T], last: Callable[[], bool]) -> T:
        """One chunk of a stream: ``fn()`` with the engine held, under ``lease`` afterwards unless
        ``last()`` says the stream ended (or ``fn`` raised)."""
        token = object()
        try:
            self._waiting.append(token)
            while True:
                with self._mutex:
                    other = self._take(lease)
                    if other is None:
                        self._waiting.remove(token)
                        self._lease = lease
                        try:
                            value = fn()
                        except BaseException:
                            self._drop(lease)
                            raise
                        if last():
                            self._drop(lease)
                        else:
                            lease.thread, lease.since = threading.get_ident(), time.monotonic()
                        return value
                other.wait(_POLL_S)
        finally:
            try:  # noqa: SIM105 -- contextlib.suppress enters in Python code: an interrupt there skips the remove
                self._waiting.remove(token)
            except ValueError:
                pass

    def release(self, lease: Lease) -> None:
        """A stream ends without another chunk (closed): its lease goes."""
        with self._mutex:
            self._drop(lease)

    def _take(self, mine: Lease | None) -> Lease | None:
        """With the mutex held: None when the caller may run now (evicting a lease that gives
        way), else the lease to wait for."""
        if self.closed:
            raise InvalidRequestError(CLOSED)
        lease = self._lease
        if lease is None or lease is mine:
            return None
        if not lease.evictable_by(threading.get_ident()):
            return lease
        self._lease = None
        if not lease.abandoned:
            lease.on_evict()
        lease.end()
        return None

    def _drop(self, lease: Lease) -> None:
        if self._lease is lease:
            self._lease = None
        lease.end()

    def close(self, free: Callable[[], None]) -> None:
        """Refuse every later call, then ``free()`` once the running request is done (a suspended
        stream is evicted: its next chunk raises)."""
        self.closing = True
        with self._mutex:
            if self.closed:
                return
            self.closed = True
            lease, self._lease = self._lease, None
            if lease is not None:
                lease.end()
            free()


class Stream(Generic[T]):
    """An open stream: iterate it for chunks; ``close()`` (or ``with``) ends it early.

    Between chunks it holds a lease on the engine, not the engine itself (see the module
    docstring): a stream left suspended — abandoned in an exception, or advanced from another
    thread — never keeps other callers waiting for long. ``result`` (``results`` for a batch)
    holds the outcome after the last chunk."""

    def __init__(self, lock: EngineLock, loop: Iterator[T], on_evict: Callable[[], None]) -> None:
        self._lock = lock
        self._loop = loop
        self._lease = Lease(on_evict)
        self._done = False
        self.result: GenerationResult | None = None
        self.results: list[GenerationResult] = []

    def __iter__(self) -> Stream[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        return self._lock.step(self._lease, self._advance, lambda: self._done)

    def _advance(self) -> T:
        try:
            return next(self._loop)
        except StopIteration as e:
            self._done = True
            if isinstance(e.value, GenerationResult):
                self.result = e.value
            elif isinstance(e.value, list):
                self.results = e.value
            raise
        except BaseException:
            self._done = True
            raise

    def close(self) -> None:
        """End the stream now (its request stops; the engine is free for the next caller)."""
        if self._done:
            return
        self._done = True
        self._lease.abandoned = True
        close = getattr(self._loop, "close", None)
        if close is not None:
            close()
        self._lock.release(self._lease)

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # collected while suspended: give the lease up without taking the engine (a collection can
        # run on a thread that holds it); the next caller evicts it
        lease = getattr(self, "_lease", None)
        if lease is not None and not self._done:
            lease.abandoned = True
            lease.end()


# ------------------------------------------------------------------------------------------------
# auto_batch


class Ticket:
    """A queued request and how it ended (set by the worker).

    ``on_chunk(chunk)`` (optional) is called on the worker thread with every chunk as it is decoded,
    ``on_done(ticket)`` once when it ends; both must be quick and must not raise (a server hands
    them to its event loop). A request cancelled while it runs ends with no result and no call."""

    def __init__(
        self,
        request: Request,
        on_chunk: Callable[[StreamChunk], None] | None = None,
        on_done: Callable[[Ticket], None] | None = None,
    ) -> None:
        self.request = request
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.done = False
        self.on_chunk = on_chunk
        self.on_done = on_done
        self.streamed = 0  # chunks handed to on_chunk so far
        self._gate = threading.Lock()  # released when result or error is set
        self._gate.acquire()

    def emit(self, chunk: StreamChunk) -> None:
        if self.on_chunk is not None:
            self.streamed += 1
            self.on_chunk(chunk)

    def finish(self, result: GenerationResult | None = None, error: BaseException | None = None) -> None:
        if not self.done:
            self.result, self.error, self.done = result, error, True
            self._gate.release()
            if self.on_done is not None:
                self.on_done(self)

    def wait(self, timeout: float) -> bool:
        if self._gate.acquire(timeout=timeout):
            self._gate.release()
            return True
        return False


class AutoBatcher:
    """auto_batch: concurrent single requests share decode steps.

    Callers queue a ticket and wait for it. A worker thread (started on demand, gone when the
    queue is empty) holds the engine and runs the oldest waiting request with the later ones
    that can share its batch; on share-buffer GQA caches requests join the running batch between
    steps. It makes way when another caller or close() waits for the engine. A failure of a
    batch reruns its unfinished requests one by one, so one bad row fails only itself. A worker
    that cannot start, or that died, is replaced; when none can start, a caller runs its own
    request on its own thread."""

    def __init__(self, lock: EngineLock, ctx: DecodeContext) -> None:
        self._lock = lock
        self._ctx = ctx
        self._queue: list[Ticket] = []  # waiting, oldest first
        self._qlock = threading.Lock()  # guards _queue and _worker
        self._worker: threading.Thread | None = None

    def submit(self, req: Request) -> GenerationResult:
        """Queue ``req`` and wait until it has run; its result (or its error, raised)."""
        ticket = Ticket(req)
        lease = self._lock._lease
        if lease is not None and lease.evictable_by(threading.get_ident()):
            # a stream this thread left suspended: the worker cannot tell, so evict it from here
            self._lock.run(lambda: None)
        try:
            with self._qlock:
                if self._lock.closed:
                    raise InvalidRequestError(CLOSED)
                self._queue.append(ticket)
            if not self._ensure_worker():
                self._run_inline(ticket)
            while not ticket.wait(0.25):
                if not self._ensure_worker():  # the worker died and no other can start
                    self._run_inline(ticket)
        except BaseException:  # interrupted while waiting: the request is dropped, or its row stopped
            req.cancel()
            with self._qlock:
                if ticket in self._queue:
                    self._queue.remove(ticket)
            raise
        if ticket.error is not None:
            raise ticket.error
        assert ticket.result is not None
        return ticket.result

    def enqueue(
        self,
        req: Request,
        on_chunk: Callable[[StreamChunk], None] | None = None,
        on_done: Callable[[Ticket], None] | None = None,
    ) -> Ticket:
        """Queue ``req`` without waiting (an HTTP server's path): its chunks go to ``on_chunk`` and
        its end to ``on_done`` (see :class:`Ticket`); ``req.cancel()`` frees its row at the next step.
        Raises EngineError when no worker thread can be started."""
        ticket = Ticket(req, on_chunk, on_done)
        with self._qlock:
            if self._lock.closed:
                raise InvalidRequestError(CLOSED)
            self._queue.append(ticket)
        if not self._ensure_worker():
            with self._qlock:
                if ticket in self._queue:
                    self._queue.remove(ticket)
            raise EngineError("auto_batch: cannot start the worker thread")
        return ticket

    @property
    def queued(self) -> int:
        """Requests waiting for a batch row now."""
        return len(self._queue)

    def _ensure_worker(self) -> bool:
        """A live worker exists (started now if needed); False when none can be started."""
        with self._qlock:
            if self._worker is not None and self._worker.is_alive():
                return True
            if not self._queue:
                return True  # nothing to run: the caller's ticket is finished or being run
            worker = threading.Thread(target=self._work, name="engine-auto-batch", daemon=True)
            try:
                worker.start()
            except RuntimeError as e:  # can't start new thread
                _log.warning("auto_batch: cannot start the worker thread (%s); requests run one by one", e)
                self._worker = None
                return False
            self._worker = worker
            return True

    def _run_inline(self, ticket: Ticket) -> None:
        """No worker: run the caller's own request on its own thread."""
        with self._qlock:
            if ticket not in self._queue:
                return  # a worker took it meanwhile
            self._queue.remove(ticket)
        try:
            ticket.finish(self._lock.run(lambda: run_to_end(generate_single(self._ctx, ticket.request))))
        except Exception as e:
            ticket.finish(error=e)

    def _work(self) -> None:
        """Run queued requests until the queue is empty, making way for waiting callers."""
        me = threading.current_thread()
        try:
            while True:
                self._lock.run(self._drain, count=False)
                self._linger()
                with self._qlock:
                    if not self._queue or self._lock.closed:
                        if self._worker is me:
                            self._worker = None
                        return
                while self._lock.contended and not self._lock.closed:
                    time.sleep(0.002)  # a caller (or close()) takes the engine before more requests run
        except BaseException as e:  # closed, or the worker itself failed: nobody must wait forever
            failed = e if isinstance(e, EngineError) else EngineError(f"auto_batch worker failed: {e!r}")
            with self._qlock:
                if self._worker is me:
                    self._worker = None
                queued, self._queue[:] = list(self._queue), []
            for t in queued:
                t.finish(error=failed)

    def _linger(self) -> None:
        """The queue is empty: wait ``WORKER_LINGER_S`` for more (the engine not held), so that
        back-to-back requests (a server's clients) do not pay a new worker thread each."""
        end = time.monotonic() + WORKER_LINGER_S
        while not self._queue and not self._lock.closed and time.monotonic() < end:
            time.sleep(0.0005)

    def _drain(self) -> None:
        while not self._lock.contended:
            group = self._next_group()
            if not group:
                return
            self._run_group(group)

    def _next_group(self) -> list[Ticket]:
        """The oldest waiting request and the later ones that can share its batch."""
        ctx = self._ctx
        with self._qlock:
            group: list[Ticket] = []
            for t in list(self._queue):
                if len(group) == ctx.max_batch:
                    break
                if t.request.cancelled:
                    self._queue.remove(t)
                elif not group or can_join_batch(ctx, [*(g.request for g in group), t.request]):
                    group.append(t)
                    self._queue.remove(t)
            return group

    def _joins(self, group: list[Ticket], tickets: dict[int, Ticket]) -> JoinSource:
        """The join source handed to the batched loop: queued requests that fit, with their rows."""

        def joins(free: list[int], width: int, take: bool) -> list[tuple[int, Request]]:
            if not self._queue or self._lock.contended:
                return []  # a caller waits for the engine: the batch drains and lets it go
            fitting: list[Ticket] = []
            with self._qlock:
                for t in list(self._queue):
                    if len(fitting) == len(free):
                        break
                    if t.request.cancelled:
                        if take:
                            self._queue.remove(t)
                    elif fits_join(self._ctx, t.request, width):
                        fitting.append(t)
                if not take:  # a probe: whether any would join (rows do not matter)
                    return [(row, t.request) for row, t in zip(free, fitting, strict=False)]
                for t in fitting:
                    self._queue.remove(t)
                    group.append(t)  # in the group from now on: an error reaches it too
                    tickets[id(t.request)] = t
            return self._join_rows([t.request for t in fitting], free)

        return joins

    def _place(self, reqs: list[Request]) -> list[Request]:
        """The rows ``0..n-1`` of a new batch for ``reqs`` (its order): each prefix-cache request
        on the row holding its longest cached prefix (:meth:`PrefixCache.route`); a prefix held by
        a row beyond ``n`` is swapped, KV and record, into a row no request matched. The other
        requests fill the remaining rows in queue order (least recently stored record first), each
        row's record first swapped out to a row beyond ``n`` holding an older one (see
        :func:`_keep_records`)."""
        ctx, prefix, n = self._ctx, self._ctx.prefix, len(reqs)
        if prefix is None or not any(r.prefix_cache for r in reqs):
            return reqs  # rows as they come (an engine whose requests keep no prefixes moves no KV)
        prompts = [r.prompt_ids if r.prefix_cache else None for r in reqs]
        chosen = prefix.route(prompts, range(ctx.max_batch), ctx.rope_switch)
        slots: list[Request | None] = [None] * n
        for i, (row, _) in chosen.items():
            if row < n:
                slots[row] = reqs[i]
        spare = sorted((b for b in range(n) if slots[b] is None), key=prefix.recency)  # least recent first
        for row, i in sorted((row, i) for i, (row, _) in chosen.items() if row >= n):
            target = spare.pop(0)
            _swap_rows(ctx, target, row)
            slots[target] = reqs[i]
        rest = iter(r for i, r in enumerate(reqs) if i not in chosen)
        _keep_records(ctx, spare, list(range(n, ctx.max_batch)))
        return [r if r is not None else next(rest) for r in slots]

    def _join_rows(self, reqs: list[Request], free: list[int]) -> list[tuple[int, Request]]:
        """Rows for requests joining the running batch, as :func:`generate_batch` takes them (the
        batch's stopped rows, then new rows ``n, n+1, ...`` in order): each prefix-cache request
        on the free row holding its longest cached prefix — a new row's KV and record swapped into
        the next row the batch grows by when it is another — the others on the stopped rows whose
        records are the least recently stored, then on new rows, each row's record first swapped
        out to an unused row beyond the batch holding an older one (see :func:`_keep_records`)."""
        ctx, prefix = self._ctx, self._ctx.prefix
        if prefix is None or not any(r.prefix_cache for r in reqs):
            return list(zip(free, reqs, strict=False))
        n = ctx.state.rows  # the running batch's rows: the free ones below n stopped, n.. are new
        prompts = [r.prompt_ids if r.prefix_cache else None for r in reqs]
        chosen = prefix.route(prompts, free, ctx.rope_switch)
        placed = [(row, reqs[i]) for i, (row, _) in chosen.items() if row < n]
        used = {row for row, _ in placed}
        stopped = sorted((b for b in free if b < n and b not in used), key=prefix.recency)
        rest = [r for i, r in enumerate(reqs) if i not in chosen]
        fresh: list[int] = []  # rows given to requests that reuse nothing there
        while rest and stopped:
            fresh.append(stopped.pop(0))
            placed.append((fresh[-1], rest.pop(0)))
        grow = n
        for row, i in sorted((row, i) for i, (row, _) in chosen.items() if row >= n):
            _swap_rows(ctx, grow, row)  # rows beyond the batch: no step touches them
            placed.append((grow, reqs[i]))
            grow += 1
        for r in rest:
            fresh.append(grow)
            placed.append((grow, r))
            grow += 1
        _keep_records(ctx, fresh, list(range(grow, ctx.max_batch)))
        return placed

    def _run_group(self, group: list[Ticket]) -> None:
        """Run a group; each ticket finishes as its row ends. After a failure, the unfinished
        requests run again one by one, so that a row's failure is that row's alone."""
        ctx = self._ctx
        reqs = [t.request for t in group]
        tickets = {id(t.request): t for t in group}
        try:
            if can_join_batch(ctx, reqs):
                events = generate_batch(ctx, self._place(reqs), self._joins(group, tickets))
            else:
                events = run_requests(ctx, reqs)
            for _, req, chunk, result in events:
                ticket = tickets[id(req)]
                ticket.emit(chunk)
                if result is not None:
                    ticket.finish(result)
        except BaseException as e:
            if not isinstance(e, Exception):  # the worker itself is stopped: nobody of its group must wait
                for t in group:
                    t.finish(error=EngineError(f"the auto_batch worker stopped while running this request: {e!r}"))
                raise
            _log.debug("auto_batch: a batch failed (%r); its requests run one by one", e)
            for t in group:
                if t.done or t.request.cancelled:
                    continue
                if t.streamed:  # its consumer has chunks already: a rerun would repeat them
                    t.finish(error=EngineError(f"the batch running this request failed: {type(e).__name__}: {e}"))
                    continue
                try:
                    t.finish(_run_streaming(generate_single(ctx, t.request), t))
                except Exception as alone:
                    err = EngineError(f"{type(alone).__name__}: {alone}")
                    err.__cause__ = alone
                    t.finish(error=err)

    def fail_queued(self, error: BaseException) -> None:
        """close(): the requests still queued end with ``error``."""
        with self._qlock:
            queued, self._queue[:] = list(self._queue), []
        for t in queued:
            t.finish(error=error)


def _swap_rows(ctx: DecodeContext, a: int, b: int) -> None:
    """Swap rows ``a`` and ``b`` of the KV cache (their cached positions) and their prefix records."""
    if ctx.prefix is not None:
        ctx.prefix.swap_rows(cast("StepState", ctx.state), a, b)


def _keep_records(ctx: DecodeContext, rows: list[int], unused: list[int]) -> None:
    """``rows`` are about to be rewritten by requests that reuse nothing there: before that, each
    one's record is swapped out to the row of ``unused`` (rows no batch runs on, none of them
    rewritten now) whose record is the least recently stored, when that one is older (or the row
    empty): the least recently used conversation gives way, so conversations that keep coming
    back keep their rows while stale ones are dropped."""
    prefix = ctx.prefix
    if prefix is None:
        return
    for row in rows:
        if not unused:
            return
        spare = min(unused, key=prefix.recency)
        if prefix.recency(spare) < prefix.recency(row):
            _swap_rows(ctx, row, spare)


def _run_streaming(loop: Iterator[StreamChunk], ticket: Ticket) -> GenerationResult:
    """Drain a single-request loop, handing each chunk to the ticket's consumer; its result."""
    while True:
        try:
            chunk = next(loop)
        except StopIteration as e:
            return e.value
        ticket.emit(chunk)

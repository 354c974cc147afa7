"""The engine side of the server: requests go to the engine's thread(s), chunks come back to the
event loop through a thread-safe handoff.

The event loop never runs a decode step. With an ``auto_batch`` engine, :meth:`Engine.submit`
queues a request for the engine's worker thread, which runs every queued request in one batch
that later requests join between decode steps (continuous batching). Without it (``max_batch``
1: the serialised baseline) one runner thread runs the requests one after another as streams.
Either way the worker calls back per chunk, and the callback puts the event in the request's
:class:`Mailbox` (a deque; the loop is woken with ``loop.call_soon_threadsafe`` once per burst).
``Job.cancel()`` frees the request's batch row at the next step (a queued request never starts).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import EngineError
from ..generation import Engine
from ..request import GenerationResult, StreamChunk
from ..scheduler import Stream, Ticket


@dataclass
class Event:
    """What a job hands to the event loop: a chunk, or its end (``result`` or ``error``)."""

    index: int  # the choice it belongs to
    chunk: StreamChunk | None = None
    result: GenerationResult | None = None
    error: BaseException | None = None
    t: float = 0.0  # perf_counter() on the engine thread when it was made

    @property
    def final(self) -> bool:
        return self.chunk is None


class Mailbox:
    """Events of one HTTP request's jobs, from the engine thread to the event loop.

    The engine thread appends to a deque and wakes the loop only when no wake-up is pending, so a
    burst of tokens costs one cross-thread wake-up, not one per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[Event] = collections.deque()
        self._armed = False  # a wake-up is scheduled and has not run yet
        self._ready = asyncio.Event()

    def put(self, event: Event) -> None:
        """Any thread."""
        self._items.append(event)
        if not self._armed:
            self._armed = True
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._armed = False  # before the consumer drains: a later put schedules a new wake-up
        self._ready.set()

    def drain(self) -> list[Event]:
        """Event loop: every event there now (maybe none)."""
        items = self._items
        out = []
        while items:
            out.append(items.popleft())
        return out

    async def get(self, timeout: float) -> list[Event]:
        """Event loop: the events there, waiting up to ``timeout`` s for one (none: timed out)."""
        out = self.drain()
        if out:
            return out
        self._ready.clear()
        out = self.drain()
        if out:
            return out
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        return self.drain()


class Job:
    """One choice of one HTTP request, as the engine runs it."""

    def __init__(self, index: int, mailbox: Mailbox) -> None:
        self.index = index
        self._mailbox = mailbox
        self.done = False  # set on the event loop when its final event is taken
        self.cancelled = False
        self._ticket: Ticket | None = None
        self.stream: Stream[StreamChunk] | None = None  # serial runner: the request as a stream
        self.stream_chunks = False  # serial runner: hand its chunks over (a streaming response)

    def _put(self, event: Event) -> None:
        try:
            self._mailbox.put(event)
        except RuntimeError:  # the loop is closed (the server stopped): nobody reads this job
            self.cancel()

    def on_chunk(self, chunk: StreamChunk) -> None:
        """Engine thread: one chunk."""
        self._put(Event(self.index, chunk=chunk, t=time.perf_counter()))

    def on_done(self, ticket: Ticket) -> None:
        """Engine thread: the request ended (result or error)."""
        self._put(Event(self.index, result=ticket.result, error=ticket.error, t=time.perf_counter()))

    def cancel(self) -> None:
        """Stop the request: its row is freed at the next decode step (no result follows)."""
        self.cancelled = True
        if self._ticket is not None:
            self._ticket.request.cancel()


class EngineRunner:
    """Starts jobs on one engine and counts what is queued and running."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.batched = engine.auto_batch
        self.max_batch = engine.max_batch if self.batched else 1
        self._serial: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if not self.batched:
            self._thread = threading.Thread(target=self._run_serial, name="engine-server-serial", daemon=True)
            self._thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for a row."""
        batcher = getattr(self.engine, "_batcher", None)
        if self.batched and batcher is not None:
            return batcher.queued
        return self._serial.qsize()

    def start(
        self,
        job: Job,
        prompt: str | Sequence[int],
        max_new_tokens: int | None,
        stop: str | Sequence[str] | None,
        sampling: Mapping[str, Any],
        *,
        stream: bool,
    ) -> None:
        """Check the request and queue it (call off the event loop: it tokenizes). Raises the
        engine's InvalidRequestError for a bad request."""
        if self.batched:
            job._ticket = self.engine.submit(
                prompt,
                max_new_tokens,
                stop=stop,
                on_chunk=job.on_chunk if stream else None,
                on_done=job.on_done,
                **sampling,
            )
            return
        job.stream = self.engine.stream(prompt, max_new_tokens, stop=stop, **sampling)
        job.stream_chunks = stream
        self._serial.put(job)

    def _run_serial(self) -> None:
        """The serialised runner: one request at a time, to its end."""
        while True:
            job = self._serial.get()
            if job is None:
                return
            stream = job.stream
            assert stream is not None
            if job.cancelled:
                stream.close()
                continue
            try:
                for chunk in stream:
                    if job.cancelled:
                        break
                    if job.stream_chunks:
                        job.on_chunk(chunk)
                stream.close()
                if not job.cancelled:
                    job._put(Event(job.index, result=stream.result, t=time.perf_counter()))
            except Exception as e:
                with contextlib.suppress(Exception):
                    stream.close()
                job._put(Event(job.index, error=e if isinstance(e, EngineError) else EngineError(repr(e))))

    def close(self) -> None:
        """Stop the serial thread (if any) and close the engine."""
        if self._thread is not None:
            self._serial.put(None)
        self.engine.close()

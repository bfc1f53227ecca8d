"""Drives an ``Engine`` from asyncio (no Ray): requests are prepared together when they arrive together, join the
running batch at the next decode step, every request's events arrive on its own queue, and a cancelled request's
rows leave before the next step.

  Preparer.prepare(job)         the requests waiting for the prepare thread go in one ``Engine.prepare_many``
                                call (images of one model encoded as one batch), so a burst also prefills together
  submit(prepared) -> queue     the request waits (FIFO) until its n rows fit in the engine's free rows and its
                                KV reservation (n x (prompt + max_tokens) positions) in the unreserved KV budget
  loop, while there is work:    [cancel] [add the waiting that fit] (admission: slots and KV bytes reserved)
                                [step] (a token for every decoding row, then prompt chunks under the step's token
                                budget; a request's first token comes at the step of its last chunk), all on one
                                engine thread

Admission is strictly first come, first served: while the oldest waiting request does not fit, nothing behind it
is admitted, even a smaller request that would fit. A large request therefore waits only for running requests to
end (at most their max_tokens each), never for a stream of small ones to pass it; the price is that small
requests wait behind it (head-of-line blocking), as in vLLM's default FCFS policy.
  cancel(request_id)            a waiting request is dropped; a running one is freed before the next step

Each queue receives the request's ``Delta`` events and one final ``End`` (``pipelines.serve_api``); a cancelled
request receives nothing more. A failure the engine cannot pin on one group ends every open request with a 500.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .serve_api import ApiError, ChatJob, End, Event
from .serve_engine import Engine, Prepared

logger = logging.getLogger("ray.serve")


class Preparer:
    """Runs ``Engine.prepare_many`` on its own thread (never the engine's), over every request that waited."""

    def __init__(self, engine: Engine, max_batch: int):
        self.engine, self.max_batch = engine, max_batch
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crosslayer-prepare")
        self.pending: list[tuple[ChatJob, str, asyncio.Future]] = []  # (job, request id, its result)
        self.task: asyncio.Task | None = None  # the loop, while requests wait

    async def prepare(self, job: ChatJob, request_id: str) -> Prepared:
        """The request prepared, or the error it gets (raised)."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Prepared] = loop.create_future()
        self.pending.append((job, request_id, result))
        if self.task is None or self.task.done():
            self.task = loop.create_task(self._run())
        return await result

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending:
            batch = [p for p in self.pending[: self.max_batch] if not p[2].done()]  # done: cancelled meanwhile
            del self.pending[: self.max_batch]
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.thread, self.engine.prepare_many,
                                                     [(job, rid) for job, rid, _ in batch])
            except Exception as err:  # noqa: BLE001 (prepare_many answers per request; this is the last resort)
                results = [err] * len(batch)
            for (_, _, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


class Scheduler:
    """Continuous batching for one engine; create and use it on one event loop."""

    def __init__(self, engine: Engine, idle_wait_s: float = 0.0, on_step: Callable[[], None] | None = None):
        self.engine = engine
        self.idle_wait_s = idle_wait_s  # an idle engine waits this long for more requests to prefill together
        self.on_step = on_step  # called on the event loop after every engine call (metrics)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crosslayer-engine")
        self.waiting: deque[Prepared] = deque()  # submitted, not yet admitted
        self.streams: dict[str, asyncio.Queue[Event]] = {}  # open requests' event queues
        self.cancelled: set[str] = set()  # admitted requests to drop before the next step
        self.task: asyncio.Task | None = None  # the loop, while there is work

    @property
    def queued(self) -> int:
        """Requests waiting for free rows."""
        return len(self.waiting)

    def submit(self, item: Prepared) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self.streams[item.request_id] = queue
        self.waiting.append(item)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())
        return queue

    def cancel(self, request_id: str) -> None:
        if self.streams.pop(request_id, None) is None:
            return  # already ended
        for item in self.waiting:
            if item.request_id == request_id:
                self.waiting.remove(item)
                return
        self.cancelled.add(request_id)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        if self.idle_wait_s > 0 and not self.engine.rows:
            await asyncio.sleep(self.idle_wait_s)
        while self.waiting or self.cancelled or self.engine.rows:
            cancelled, self.cancelled = self.cancelled, set()
            try:
                if cancelled:  # their rows and KV bytes are free for this round's admission
                    await loop.run_in_executor(self.thread, self.engine.cancel, cancelled)
                admit: list[Prepared] = []
                while self.waiting and self.engine.fits([*admit, self.waiting[0]]):  # FIFO: the head first, always
                    admit.append(self.waiting.popleft())
                if self.waiting and not admit and not self.engine.rows:  # an idle engine cannot take it: never will
                    self._refuse(self.waiting.popleft())
                if admit:
                    self._publish(await loop.run_in_executor(self.thread, self.engine.add, admit))
                if self.engine.rows:
                    self._publish(await loop.run_in_executor(self.thread, self.engine.step))
            except Exception as err:  # noqa: BLE001 (the engine handles its own per-group failures)
                logger.exception("crosslayer: the engine failed")
                await loop.run_in_executor(self.thread, self.engine.reset)
                queued = {item.request_id for item in self.waiting}
                for rid in [rid for rid in self.streams if rid not in queued]:
                    self._publish([(rid, End(error=ApiError.internal(err, during="generating")))])
            if self.on_step is not None:
                self.on_step()

    def _refuse(self, item: Prepared) -> None:
        """End a request that even an idle engine cannot admit (``Engine.prepare`` refuses these first)."""
        try:
            self.engine.admissible(item)
            error = ApiError(400, f"request {item.request_id} does not fit in this replica's rows or KV budget")
        except ApiError as err:
            error = err
        self._publish([(item.request_id, End(error=error))])

    def _publish(self, events: list[tuple[str, Event]]) -> None:
        for rid, event in events:
            queue = self.streams.get(rid)
            if queue is None:
                continue  # cancelled meanwhile
            queue.put_nowait(event)
            if isinstance(event, End):
                del self.streams[rid]

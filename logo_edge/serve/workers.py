"""The engines behind the server: N worker threads, each the sole owner of one Engine, and one queue.

A request is a job: a function run on a worker's engine, whose chunks come back to the event loop as
they are made. A client that goes away sets the job's cancel flag; the worker stops its generation
at the next token and takes the next job. Pool changes (load, unload) are writers: they wait for the
running jobs to finish, hold new ones back, run on every engine, then let the queue go on, so no
adapter is freed under a running decode and every engine serves the same pool.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

_DONE = object()
POLL_S = 0.02


class QueueFullError(RuntimeError):
    """More requests are waiting than the server accepts."""


@dataclass
class _Job:
    fn: Callable[[Any], Any]  # engine -> value, or an iterator of chunks when `stream`
    stream: bool
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening
            self.cancelled.set()


class _Worker:
    def __init__(self, owner: "Workers", make_engine: Callable[[], Any], index: int):
        self.owner = owner
        self.index = index
        self.ops: queue.Queue = queue.Queue()
        self.engine = None
        self.ready: Future = Future()
        self.thread = threading.Thread(target=self._main, args=(make_engine,), name=f"logo-edge-engine-{index}",
                                       daemon=True)
        self.thread.start()

    def _main(self, make_engine) -> None:
        try:
            self.engine = make_engine()
        except BaseException as e:  # the server reports it at start-up
            self.ready.set_exception(e)
            return
        self.ready.set_result(True)
        try:
            while not self.owner.stopping.is_set():
                self._apply_ops()
                try:
                    job = self.owner.jobs.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                self.owner._admit(self)
                try:
                    self._run(job)
                finally:
                    self.owner._release()
        finally:
            self.engine.close()

    def _run(self, job: _Job) -> None:
        if job.cancelled.is_set():  # the client left while the job waited
            job.put(_DONE)
            return
        try:
            result = job.fn(self.engine)
            if job.stream:
                try:
                    for item in result:
                        job.put(item)
                        if job.cancelled.is_set():
                            break
                finally:
                    result.close()  # stops the generation and frees the engine at once
            else:
                job.put(result)
        except Exception as e:  # the request fails, the worker goes on
            job.put(e)
        job.put(_DONE)

    def post(self, op: Callable[[Any], Any]) -> Future:
        fut: Future = Future()
        self.ops.put((op, fut))
        return fut

    def _apply_ops(self) -> None:
        while True:
            try:
                op, fut = self.ops.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(op(self.engine))
            except Exception as e:
                fut.set_exception(e)


class Workers:
    """N engines, each owned by one thread, fed from one queue."""

    def __init__(self, make_engine: Callable[[], Any], n: int = 1, max_queue: int = 256):
        if n < 1:
            raise ValueError(f"the server needs at least one engine, got --parallel {n}")
        self.jobs: queue.Queue = queue.Queue()
        self.max_queue = max_queue
        self.stopping = threading.Event()
        self._cond = threading.Condition()
        self._active = 0  # jobs running
        self._writer = False  # a pool change is waiting or running
        self._workers = [_Worker(self, make_engine, i) for i in range(n)]
        try:
            for w in self._workers:
                w.ready.result()
        except BaseException:
            self.close()
            raise

    @property
    def engine(self):
        """The first engine, for reading what all share (model, pool names); never for generating."""
        return self._workers[0].engine

    def __len__(self) -> int:
        return len(self._workers)

    # ---- requests

    def _submit(self, fn, stream: bool) -> _Job:
        if self.jobs.qsize() >= self.max_queue:
            raise QueueFullError(f"{self.jobs.qsize()} requests are already waiting; try again shortly")
        job = _Job(fn, stream, asyncio.get_running_loop())
        self.jobs.put(job)
        return job

    async def stream(self, fn: Callable[[Any], Any]) -> AsyncIterator[Any]:
        """Run fn(engine) -> iterator on a worker; yield its items. Leaving early cancels the job."""
        job = self._submit(fn, True)
        try:
            while (item := await job.out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run fn(engine) on a worker and return its value."""
        job = self._submit(fn, False)
        try:
            item = await job.out.get()
            if isinstance(item, BaseException):
                raise item
            return item
        finally:
            job.cancelled.set()

    # ---- pool changes: one writer at a time, with no job running

    def _admit(self, w: _Worker) -> None:
        while True:
            w._apply_ops()  # a waiting writer may need this worker's engine
            with self._cond:
                if not self._writer:
                    self._active += 1
                    return
                self._cond.wait(POLL_S)

    def _release(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def on_every_engine(self, op: Callable[[Any], Any]) -> list:
        """Run op(engine) on every engine while no job runs (blocking; call it from a thread).

        Returns each engine's result, or raises the first engine's error after the others ran."""
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._writer = True
            while self._active:
                self._cond.wait()
        try:
            futures = [w.post(op) for w in self._workers]
            results, errors = [], []
            for f in futures:
                try:
                    results.append(f.result())
                except Exception as e:
                    errors.append(e)
            if errors:
                raise errors[0]
            return results
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()

    def close(self) -> None:
        self.stopping.set()
        for w in self._workers:
            w.thread.join(timeout=30)

"""The local executor: an ordered parallel map over worker processes, and read-ahead threads.

:class:`OrderedPool` forks ``workers`` processes that apply one function to items sent from this
process and returns the results in submission order. Any idle worker takes the next item, so all
of them stay busy, while the order of the results never depends on the worker count; at most
``window`` items are in flight, sent as soon as :meth:`OrderedPool.map` is called (the workers
decode while the caller loads its models). The function is inherited through fork (it need not be
picklable); tensors in results travel through shared memory. With ``workers=0`` the map runs
lazily in this process.

Workers die with their parent: Linux sends them SIGKILL when it dies (``prctl(PR_SET_PDEATHSIG)``),
and they also check the parent's pid while idle, so a ``kill -9`` of the main process leaves no
decoder behind (tests/test_execute.py).

:func:`read_ahead` yields the items of several sources in order while threads read the next ones
(overlapping the I/O of remote shards).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import signal
import sys
import threading
import traceback
from typing import Callable, Generic, Iterable, Iterator, Sequence, TypeVar

import torch
import torch.multiprocessing  # noqa: F401  (registers shared-memory pickling of tensors)

Item = TypeVar("Item")
Result = TypeVar("Result")

_PR_SET_PDEATHSIG = 1
_POLL_SECONDS = 0.5


def die_with_parent(parent_pid: int) -> None:
    """Have Linux SIGKILL this process when its parent dies; exit at once if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent-pid checks of the worker loop remain
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def _quiet_when_the_parent_hangs_up(hook: Callable) -> Callable:
    """``sys.excepthook`` for a worker: a connection its parent dropped is not worth a traceback.

    The parent fetches each result tensor's shared memory through a socket of multiprocessing's
    resource sharer, whose thread in the worker reports every failure with ``sys.excepthook``. A
    parent interrupted (Ctrl-C) while fetching resets that socket: the parent says so in one line,
    and the worker's traceback of the reset would follow it on the terminal."""

    def quiet(kind, value, trace) -> None:
        if not issubclass(kind, (EOFError, ConnectionError)):
            hook(kind, value, trace)

    return quiet


def _worker_loop(func: Callable, tasks, results, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    sys.excepthook = _quiet_when_the_parent_hangs_up(sys.excepthook)
    torch.set_num_threads(1)  # one core per worker: W workers use W cores
    while True:
        try:
            task = tasks.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            if os.getppid() != parent_pid:
                return
            continue
        if task is None:
            return
        generation, index, item = task
        try:
            results.put(("ok", generation, index, func(item)))
        except BaseException as error:  # a bug, not bad input (decoding turns bad input into statuses)
            results.put(("error", generation, index, (_picklable(error), traceback.format_exc())))


def _picklable(error: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


class WorkerDied(RuntimeError):
    pass


class OrderedPool(Generic[Item, Result]):
    """``workers`` forked processes applying ``func``; :meth:`map` yields results in input order.

    Use as a context manager (or call :meth:`close`); one :meth:`map` at a time: a new map, or
    :meth:`close`, abandons the one before (reading an abandoned map raises, never hangs).
    """

    def __init__(self, func: Callable[[Item], Result], workers: int, window: int | None = None):
        self.func = func
        self.workers = max(0, workers)
        self.window = window or 4 * max(1, self.workers)
        self._generation = 0
        self._active_stop: threading.Event | None = None
        self._processes: list = []
        if self.workers:
            context = multiprocessing.get_context("fork")
            self._tasks = context.Queue()
            self._results = context.Queue()
            for _ in range(self.workers):
                process = context.Process(target=_worker_loop, args=(func, self._tasks, self._results, os.getpid()),
                                          daemon=True)
                process.start()
                self._processes.append(process)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def map(self, items: Iterable[Item]) -> Iterator[Result]:
        """The results of ``func`` over ``items``, in order. With workers, reading and decoding start
        now, before the first result is asked for (work can run while the caller prepares); a new
        map abandons the one before."""
        if not self.workers:
            return map(self.func, items)
        self._abandon_active()
        self._generation += 1
        slots = threading.Semaphore(self.window)
        stop = threading.Event()
        feeder_error: list[BaseException] = []
        feeder = threading.Thread(target=self._feed, args=(items, self._generation, slots, stop, feeder_error),
                                  name="mimicfilter-reader", daemon=True)
        self._active_stop = stop
        feeder.start()
        return self._collect(self._generation, slots, stop, feeder_error)

    def _collect(self, generation: int, slots: threading.Semaphore, stop: threading.Event,
                 feeder_error: list[BaseException]) -> Iterator[Result]:
        expected: int | None = None
        done: dict[int, Result] = {}
        next_index = 0
        try:
            while expected is None or next_index < expected:
                if next_index in done:
                    result = done.pop(next_index)
                    next_index += 1
                    slots.release()
                    yield result
                    continue
                try:
                    kind, message_generation, index, payload = self._results.get(timeout=_POLL_SECONDS)
                except queue.Empty:
                    if stop.is_set():  # a newer map or close() took the workers
                        raise RuntimeError("an abandoned OrderedPool.map was read") from None
                    self._check_alive()
                    continue
                if message_generation != generation:
                    continue  # a result of an abandoned map
                if kind == "ok":
                    done[index] = payload
                elif kind == "end":
                    expected = index
                elif kind == "reader_error":
                    raise feeder_error[0]
                else:
                    error, text = payload
                    raise error from RuntimeError(f"in a worker process:\n{text}")
        finally:
            stop.set()
            if expected is None or next_index < expected:
                self._drain_tasks()

    def _abandon_active(self) -> None:
        """Stop the feeder of a map that was not read to its end (or never read at all)."""
        if self._active_stop is not None and not self._active_stop.is_set():
            self._active_stop.set()
            self._drain_tasks()
        self._active_stop = None

    def _feed(self, items: Iterable[Item], generation: int, slots: threading.Semaphore, stop: threading.Event,
              error: list[BaseException]) -> None:
        """Reads the items (in this thread) and hands them to the workers, ``window`` at most in flight."""
        count = 0
        iterator = iter(items)
        try:
            for item in iterator:
                while not slots.acquire(timeout=_POLL_SECONDS):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                self._tasks.put((generation, count, item))
                count += 1
            self._results.put(("end", generation, count, None))
        except BaseException as exc:  # e.g. a refused pipe: URL; re-raised by map() in the main thread
            error.append(exc)
            self._results.put(("reader_error", generation, count, None))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def _drain_tasks(self) -> None:
        try:
            while True:
                self._tasks.get_nowait()
        except (queue.Empty, OSError, ValueError):
            pass

    def _check_alive(self) -> None:
        dead = [process for process in self._processes if not process.is_alive()]
        if dead:
            raise WorkerDied(f"a decoding worker process died (exit code {dead[0].exitcode})")

    def close(self) -> None:
        if not self._processes:
            return
        self._abandon_active()
        self._drain_tasks()
        for _ in self._processes:
            self._tasks.put(None)
        for process in self._processes:
            process.join(timeout=2)
        for process in self._processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=2)
        self._tasks.cancel_join_thread()
        self._results.cancel_join_thread()
        self._processes = []

    def __enter__(self) -> OrderedPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_END = object()


def read_ahead(sources: Sequence[Callable[[], Iterable[Item]]], depth: int = 1, buffer: int = 256) -> Iterator[Item]:
    """The items of every source, in order; with ``depth`` > 1 the next ``depth - 1`` sources are
    read ahead by threads into bounded buffers (for remote shards, whose reads are mostly waiting)."""
    if depth <= 1:
        for source in sources:
            yield from source()
        return
    stop = threading.Event()
    queues: dict[int, queue.Queue] = {}

    def put(out: queue.Queue, message: tuple) -> bool:
        while not stop.is_set():
            try:
                out.put(message, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def run(position: int) -> None:
        out = queues[position]
        iterator = iter(sources[position]())
        try:
            for item in iterator:
                if not put(out, (True, item)):
                    return
            put(out, (True, _END))
        except BaseException as error:
            put(out, (False, error))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def start(position: int) -> None:
        if position < len(sources) and position not in queues:
            queues[position] = queue.Queue(maxsize=buffer)
            threading.Thread(target=run, args=(position,), name="mimicfilter-read-ahead", daemon=True).start()

    try:
        for position in range(len(sources)):
            for ahead in range(position, position + depth):
                start(ahead)
            out = queues.pop(position)
            while True:
                ok, item = out.get()
                if not ok:
                    raise item
                if item is _END:
                    break
                yield item
    finally:
        stop.set()

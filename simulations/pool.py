"""Long-lived worker processes for a sweep: each runs whole cells, one at a time.

Importing torch and Flower costs seconds, so a worker imports them once (``warm_up``) and then
runs cell after cell. Workers are started with ``spawn``, never ``fork``: the parent may have
imported torch (whose thread pools do not survive a fork) and holds a live progress display.

:class:`WorkerPool` is written for the failure modes of long experiments. A task that runs past
``task_timeout`` has its worker killed (SIGKILL) and replaced; a worker that dies (killed for
memory, a crash in native code) is replaced too; in both cases the task is reported as failed
with what happened, and the pool goes on with the next task. A worker that finds its parent
gone (the sweep killed with SIGKILL) exits at once, so no cell keeps running unseen.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

#: How often a worker checks that its parent is still alive.
_PARENT_CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class Outcome:
    """How a task ended.

    Attributes
    ----------
    status : str
        ``"done"`` (the task function returned), ``"raised"`` (it raised: ``detail`` is the
        traceback), ``"timeout"`` (past ``task_timeout``: the worker was killed) or ``"died"``
        (the worker process ended while running it: ``detail`` gives the exit code).
    seconds : float
        Wall seconds from handing the task to its worker to its end.
    detail : str
        What went wrong; empty when done.
    """

    status: str
    seconds: float
    detail: str = ""


def _resolve(reference: str) -> Callable[..., Any]:
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(_PARENT_CHECK_SECONDS)
        if os.getppid() != parent_pid:
            os._exit(3)  # the parent is gone: nobody will read this cell, stop now


def _worker_main(connection: Connection, parent_pid: int, function: str, warm_up: str | None) -> None:
    """A worker's life: warm up, say ready, then run one task per message until told to stop."""
    # Ctrl-C reaches the whole process group; the parent decides what happens to running cells.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    try:
        if warm_up:
            _resolve(warm_up)()
        task_function = _resolve(function)
    except BaseException:  # noqa: BLE001 - reported to the parent, which cannot run tasks here
        connection.send(("broken", traceback.format_exc()))
        return
    connection.send(("ready", None))
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        key, payload = message
        try:
            task_function(payload)
        except Exception:  # noqa: BLE001 - the task's failure is the parent's to report
            connection.send(("raised", (key, traceback.format_exc())))
        else:
            connection.send(("done", (key, None)))


class _Worker:
    def __init__(self, context, function: str, warm_up: str | None) -> None:
        self.connection, child = context.Pipe(duplex=True)
        self.process = context.Process(target=_worker_main, args=(child, os.getpid(), function, warm_up),
                                       name="phalanx-sweep-worker", daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.task: tuple[Any, float] | None = None  # (key, started)

    def stop(self, grace: float = 2.0) -> None:
        if self.process.is_alive():
            try:
                self.connection.send(None)
            except (OSError, ValueError):
                pass
            self.process.join(grace)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.connection.close()


class WorkerPool:
    """Run tasks in ``jobs`` long-lived spawned workers, with a per-task timeout.

    Parameters
    ----------
    jobs : int
        Workers (>= 1).
    function : str
        ``"module:function"`` each worker calls with a task's payload.
    warm_up : str or None
        ``"module:function"`` each worker calls once when it starts (the imports).
    task_timeout : float or None
        Seconds a task may run; None or 0 for no limit.

    Raises
    ------
    ValueError
        If ``jobs`` < 1 or ``task_timeout`` < 0.
    """

    def __init__(self, jobs: int, function: str, *, warm_up: str | None = None,
                 task_timeout: float | None = None) -> None:
        if jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {jobs}")
        if task_timeout is not None and task_timeout < 0:
            raise ValueError(f"--cell-timeout must be >= 0 seconds (0: no limit), got {task_timeout}")
        self.jobs = jobs
        self.function = function
        self.warm_up = warm_up
        self.task_timeout = task_timeout or None
        self._context = multiprocessing.get_context("spawn")

    def run(self, tasks: Sequence[tuple[Any, Any]], *, on_start: Callable[[Any], None] | None = None,
            on_end: Callable[[Any, Outcome], None] | None = None) -> dict[Any, Outcome]:
        """Run every ``(key, payload)`` task; return each key's :class:`Outcome`.

        ``on_start(key)`` and ``on_end(key, outcome)`` are called in this process as tasks start
        and end. Workers are stopped before this returns or raises (Ctrl-C included).

        Raises
        ------
        RuntimeError
            If a worker cannot even start (its warm-up raised): no task could run anywhere.
        """
        queue = deque(tasks)
        outcomes: dict[Any, Outcome] = {}
        workers = [self._start() for _ in range(min(self.jobs, len(queue)))]
        try:
            while queue or any(w.task is not None for w in workers):
                for worker in workers:
                    if worker.ready and worker.task is None and queue:
                        key, payload = queue.popleft()
                        worker.task = (key, time.monotonic())
                        worker.connection.send((key, payload))
                        if on_start is not None:
                            on_start(key)
                waitables = [w.connection for w in workers] + [w.process.sentinel for w in workers]
                wait(waitables, timeout=self._next_deadline(workers))
                alive = []
                for worker in workers:
                    if not self._collect(worker, outcomes, on_end):
                        alive.append(worker)
                    elif queue:  # a lost worker is replaced while there is work left for it
                        alive.append(self._start())
                workers = alive
        finally:
            for worker in workers:
                worker.stop()
        return outcomes

    def _start(self) -> _Worker:
        return _Worker(self._context, self.function, self.warm_up)

    def _next_deadline(self, workers: list[_Worker]) -> float | None:
        if self.task_timeout is None:
            return None
        running = [started for w in workers if w.task is not None for _, started in [w.task]]
        if not running:
            return None
        return max(0.0, min(running) + self.task_timeout - time.monotonic())

    def _collect(self, worker: _Worker, outcomes: dict[Any, Outcome],
                 on_end: Callable[[Any, Outcome], None] | None) -> bool:
        """Handle what ``worker`` said or did; True when it is gone and must be replaced."""
        def end(outcome: Outcome) -> None:
            key = worker.task[0]
            worker.task = None
            outcomes[key] = outcome
            if on_end is not None:
                on_end(key, outcome)

        try:
            while worker.connection.poll():
                kind, body = worker.connection.recv()
                if kind == "ready":
                    worker.ready = True
                elif kind == "broken":
                    raise RuntimeError(f"a sweep worker could not start:\n{body}")
                else:
                    key, detail = body
                    end(Outcome("done" if kind == "done" else "raised", time.monotonic() - worker.task[1],
                                detail or ""))
        except (EOFError, OSError):
            pass  # the pipe closed: the process is gone, handled below
        if worker.task is not None and self.task_timeout is not None:
            elapsed = time.monotonic() - worker.task[1]
            if elapsed >= self.task_timeout:
                worker.kill()
                end(Outcome("timeout", elapsed, f"ran past the timeout of {self.task_timeout:g} s; "
                                                f"its worker was killed and replaced"))
                return True
        if not worker.process.is_alive():
            worker.process.join()
            if worker.task is not None:
                end(Outcome("died", time.monotonic() - worker.task[1],
                            f"its worker process died (exit code {worker.process.exitcode})"))
            elif not worker.ready:
                raise RuntimeError(f"a sweep worker exited before it was ready (exit code {worker.process.exitcode})")
            worker.connection.close()
            return True
        return False

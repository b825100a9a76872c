"""Statements spread over several connections, one thread each, until none is left.

A task may add more tasks (a table's indexes once its last slice is in). The first failure,
or a signal in the main thread, cancels the statement running on every other connection,
and that first error is raised once every thread has stopped.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import psycopg

Task = Callable[[psycopg.Connection[Any]], None]

_CANCEL_WAIT = 5  # seconds a cancel request may take


class Pool:
    def __init__(self, connections: list[psycopg.Connection[Any]]) -> None:
        self.connections = connections
        self._queue: deque[Task] = deque()
        self._running = 0
        self._failures: list[BaseException] = []
        self._changed = threading.Condition()

    def add(self, task: Task, *, first: bool = False) -> None:
        """Queue a task; `first` puts it ahead of everything queued."""
        with self._changed:
            if first:
                self._queue.appendleft(task)
            else:
                self._queue.append(task)
            self._changed.notify_all()

    def run(self) -> None:
        threads = [
            threading.Thread(target=self._work, args=(conn,), name=f"copy-{n}", daemon=True)
            for n, conn in enumerate(self.connections, start=1)
        ]
        for thread in threads:
            thread.start()
        try:
            while any(t.is_alive() for t in threads):
                for thread in threads:
                    thread.join(timeout=0.5)
                if self._failures:
                    # Again and again: a statement may have started after the first cancel.
                    self._cancel(None)
        except BaseException as exc:  # a signal, in this (the main) thread
            self._fail(exc, None)
            while any(t.is_alive() for t in threads):
                self._cancel(None)
                for thread in threads:
                    thread.join(timeout=0.5)
        if self._failures:
            raise self._failures[0]

    def _work(self, conn: psycopg.Connection[Any]) -> None:
        while True:
            with self._changed:
                while not self._failures and not self._queue and self._running:
                    self._changed.wait()
                if self._failures or not self._queue:
                    self._changed.notify_all()
                    return
                task = self._queue.popleft()
                self._running += 1
            try:
                task(conn)
            except BaseException as exc:
                self._fail(exc, conn)
                return
            finally:
                with self._changed:
                    self._running -= 1
                    self._changed.notify_all()

    def _fail(self, exc: BaseException, conn: psycopg.Connection[Any] | None) -> None:
        with self._changed:
            self._failures.append(exc)
            self._changed.notify_all()
        self._cancel(conn)

    def _cancel(self, spare: psycopg.Connection[Any] | None) -> None:
        """Cancel whatever runs on the connections other than `spare`."""
        for conn in self.connections:
            if conn is not spare and not conn.closed:
                conn.cancel_safe(timeout=_CANCEL_WAIT)

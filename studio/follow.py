"""Follow runs' event files from a background thread, for live views.

Contract: ``Follower`` tails ``events.jsonl`` of every run it is asked about (``watch(run)``) on one
daemon thread, keeping each run's events in memory; ``snapshot(run_id)`` returns a copy of the
events read so far (and reads synchronously if the thread has not caught up yet), completed as
``Run.complete`` does (a torn last line of a finished worker, the terminal record of ``final.json``).  Because
everything comes from the run folder, a page reload, a second browser or an app restart shows the
same history.
"""

from __future__ import annotations

import threading
import time

from studio.runs import Run


class Follower:
    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self._lock = threading.Lock()
        self._runs: dict[str, Run] = {}
        self._events: dict[str, list[dict]] = {}
        self._offsets: dict[str, int] = {}
        self._thread = threading.Thread(target=self._loop, name="run-follower", daemon=True)
        self._stop = threading.Event()
        self._thread.start()

    def watch(self, run: Run) -> None:
        with self._lock:
            if run.id not in self._runs or self._runs[run.id].dir != run.dir:
                self._runs[run.id] = run
                self._events[run.id] = []
                self._offsets[run.id] = 0
        self._poll(run.id)

    def _poll(self, run_id: str) -> None:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return
            evs, off = run.events(self._offsets[run_id])
            self._events[run_id].extend(evs)
            self._offsets[run_id] = off

    def snapshot(self, run: Run) -> list[dict]:
        self.watch(run)
        with self._lock:
            events, offset = list(self._events[run.id]), self._offsets[run.id]
        return run.complete(events, offset)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for rid in list(self._runs):
                try:
                    self._poll(rid)
                except Exception:  # noqa: BLE001 - one odd folder must not stop following the others
                    pass
            time.sleep(self.interval)

    def close(self) -> None:
        self._stop.set()

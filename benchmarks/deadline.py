"""Time budgets and crash-safe result files for benchmark runs that must fit a short GPU lease.

``Deadline``: loops ask ``allows(predicted_s)`` before each measurement and skip the rest (recording
what) once the next one would not finish in time. ``Recorder``: the result dict, rewritten to disk
(temp file + rename, so a reader never sees half a file) after every measurement, and a watchdog
that, should one measurement run far past its prediction, writes what was measured and ends the
process at the budget: a stage never overruns and never comes back empty.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import threading
import time


class Deadline:
    """``budget_s`` from ``start`` (``time.monotonic()``); ``reserve_s`` is kept for writing results."""

    def __init__(self, budget_s: float, *, reserve_s: float = 5.0, start: float | None = None):
        self.budget_s, self.reserve_s = float(budget_s), float(reserve_s)
        self.start = time.monotonic() if start is None else start
        self.end = self.start + self.budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        """Seconds left for measuring (the reserve excluded); may be negative."""
        return self.end - self.reserve_s - time.monotonic()

    def allows(self, predicted_s: float) -> bool:
        return self.remaining() >= predicted_s


class Recorder:
    """A result dict saved atomically to ``path`` (None: not saved) on every ``save``; ``skip`` records what a
    deadline cut."""

    def __init__(self, path: pathlib.Path | None, results: dict):
        self.path, self.results = (None if path is None else pathlib.Path(path)), results
        self.results.setdefault("skipped", [])
        self.children: list[subprocess.Popen] = []  # killed by the watchdog (a server holding the GPU)
        self._lock = threading.Lock()
        self._watchdog: threading.Timer | None = None

    def save(self) -> None:
        if self.path is None:  # a run that only prints
            return
        with self._lock:
            text = json.dumps(self.results, indent=2, default=str) + "\n"
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)

    def skip(self, what: str, reason: str, deadline: Deadline | None = None, predicted_s: float | None = None) -> None:
        entry = {"what": what, "reason": reason}
        if deadline is not None:
            entry["remaining_s"] = round(deadline.remaining(), 1)
        if predicted_s is not None:
            entry["predicted_s"] = round(predicted_s, 1)
        self.results["skipped"].append(entry)
        print(f"  skipped {what}: {reason}", flush=True)
        self.save()

    def arm(self, deadline: Deadline, exit_code: int = 3) -> None:
        """At the deadline's end: record the overrun, kill ``children``, save, and exit the process."""
        def fire():
            self.results["status"] = "stopped by watchdog at the budget"
            for child in self.children:
                if child.poll() is None:
                    child.kill()
            for _ in range(3):  # the main thread may be mid-update of the dict: retry the dump
                try:
                    self.save()
                    break
                except RuntimeError:
                    time.sleep(0.05)
            print(f"watchdog: budget of {deadline.budget_s:.0f} s reached; wrote {self.path}", flush=True)
            os._exit(exit_code)

        self._watchdog = threading.Timer(max(0.0, deadline.end - time.monotonic()), fire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

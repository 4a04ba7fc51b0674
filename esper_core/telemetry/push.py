"""Pushing a run's metrics to a Prometheus Pushgateway, for runs too short to be scraped.

A scrape every 15-60 s misses most of a two-minute run, and the series vanish when the process
exits. With ``telemetry.pushgateway_url`` the run's registry is pushed every
``pushgateway_every_s`` on a daemon thread and once more when the run stops, so the final values
stay on the gateway for Prometheus to scrape. Pushing never fails or slows the run: each push has
a short timeout, runs off the training thread (except the final one), and a failure is logged
(once per streak of failures, without the URL, which may hold credentials) and counted.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from prometheus_client import CollectorRegistry, push_to_gateway

log = logging.getLogger(__name__)
PUSH_TIMEOUT_S = 5.0


def default_instance() -> str:
    """``host:pid``: what a scrape's ``instance`` label would say, unique per training process."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Pusher:
    """Pushes ``registry`` under ``job``/``instance`` every ``every_s`` seconds and at :meth:`close`."""

    def __init__(self, registry: CollectorRegistry, url: str, job: str, every_s: float,
                 instance: str | None = None, timeout_s: float = PUSH_TIMEOUT_S) -> None:
        self.registry, self.url, self.job, self.every_s, self.timeout_s = registry, url, job, every_s, timeout_s
        self.grouping_key = {"instance": instance or default_instance()}
        self.pushes = 0
        self.failures = 0
        self._failing = False
        self._lock = threading.Lock()  # one push at a time: the periodic thread and the final push
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Push once now, then every ``every_s`` seconds on a daemon thread."""
        self.push()
        self._thread = threading.Thread(target=self._loop, name="esper-pushgateway", daemon=True)
        self._thread.start()

    def push(self) -> bool:
        """Push the registry's current values; ``False`` (logged, counted) when the gateway refused or
        could not be reached."""
        with self._lock:
            try:
                push_to_gateway(self.url, job=self.job, registry=self.registry, grouping_key=self.grouping_key,
                                timeout=self.timeout_s)
            except Exception as exc:  # URLError, HTTPError, timeouts, DNS: none of them may stop training
                self.failures += 1
                if not self._failing:
                    log.warning("metrics push to the Pushgateway failed (%s: %s); the run goes on",
                                type(exc).__name__, getattr(exc, "reason", None) or getattr(exc, "code", None) or exc)
                self._failing = True
                return False
            self.pushes += 1
            if self._failing:
                log.info("metrics push to the Pushgateway works again")
            self._failing = False
            return True

    def close(self) -> None:
        """Stop the periodic pushes and push the final values."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 1)
            self._thread = None
        self.push()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.push()

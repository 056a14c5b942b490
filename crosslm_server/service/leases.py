"""What a worker process does beside its rounds when it shares a `LeaseStore` with other workers:
extend the lease of the round it runs (`LeaseKeeper`) and hand the rounds of lost workers back to
the queue (`Reaper`). Both run in their own threads, so a long step of a round (a CUDA call, a
blocked loop) never stops a heartbeat (docs/service.md, "Production topology").
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from crosslm_shared.errors import LeaseLostError
from crosslm_server.service.store.base import Lease, LeaseStore

log = logging.getLogger(__name__)


class _Every:
    """A daemon thread that calls `tick()` every `every_s` until `stop()` or until tick returns False."""

    def __init__(self, name: str, every_s: float):
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            if self.tick() is False:
                return

    def tick(self) -> bool | None:
        raise NotImplementedError


class LeaseKeeper(_Every):
    """Heartbeats one lease every `every_s` until `stop()`; remembers when the lease was lost."""

    def __init__(self, store: LeaseStore, lease: Lease, *, lease_s: float, every_s: float,
                 clock: Callable[[], float]):
        super().__init__("crosslm-heartbeat", every_s)
        self.store, self.lease, self.lease_s, self.clock = store, lease, lease_s, clock
        self.lost = ""

    def check(self) -> None:
        """Raise LeaseLostError once a heartbeat found the lease gone."""
        if self.lost:
            raise LeaseLostError(self.lost)

    def renew(self) -> None:
        """Heartbeat now, in the caller's thread (just before the round's result is written)."""
        self.check()
        try:
            self.lease = self.store.heartbeat(self.lease, lease_s=self.lease_s, now=self.clock())
        except LeaseLostError as e:
            self.lost = str(e)
            raise

    def tick(self) -> bool:
        sid = self.lease.submission.submission_id
        try:
            self.lease = self.store.heartbeat(self.lease, lease_s=self.lease_s, now=self.clock())
        except LeaseLostError as e:
            self.lost = str(e)
            log.warning("round for submission %s: %s", sid, e)
            return False
        except Exception:  # noqa: BLE001 - a store hiccup: try again; the lease's length is the margin
            log.exception("round for submission %s: heartbeat failed; retrying in %.0f s", sid, self.every_s)
        return True


class Reaper(_Every):
    """Every `every_s`: rounds whose lease ended go back to the queue, or to the dead-letter state
    after `max_attempts` claims. Any number of processes may run one: each expired round is
    reaped once (the store's update decides)."""

    def __init__(self, store: LeaseStore, *, every_s: float, max_attempts: int, clock: Callable[[], float],
                 on_requeued: Callable[[], None] = lambda: None):
        super().__init__("crosslm-reaper", every_s)
        self.store, self.max_attempts, self.clock, self.on_requeued = store, max_attempts, clock, on_requeued

    def reap(self) -> tuple[list[str], list[str]]:
        requeued, dead = self.store.reap_expired(now=self.clock(), max_attempts=self.max_attempts)
        for sid in requeued:
            log.warning("submission %s: its worker's lease expired; queued to run again", sid)
        for sid in dead:
            log.error("submission %s: its workers were lost %d times; dead-lettered (failed)", sid, self.max_attempts)
        if requeued:
            self.on_requeued()
        return requeued, dead

    def tick(self) -> None:
        try:
            self.reap()
        except Exception:  # noqa: BLE001 - logged; the next pass tries again
            log.exception("reaping expired leases failed; retrying in %.0f s", self.every_s)

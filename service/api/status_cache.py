"""Job status bodies, kept for a fraction of a second per API process (GET /v1/jobs/{id}).

Polling is the API's hottest path: many clients ask for the same running job many times a second.
Requests for one job that arrive while its status is being read share that read (``fetch``): 50
polling clients cost one database read at a time instead of 50 in the thread pool, and the waiting
ones take no thread-pool hop. An answer is then at most one read's duration older than the request
(milliseconds). With ``GRADTUNE_STATUS_CACHE_SECONDS`` above 0 (default 0) each answer is also kept
that long; this process's own writes to a job (cancel) drop its entry at once. The entry carries the
job's tenant, checked on every hit exactly as the database query would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

SIZE = 10_000  # entries at most; then the cache starts over


@dataclass(frozen=True)
class CachedStatus:
    tenant: str
    body: bytes  # the JobPublic, serialized
    until: float  # time.monotonic() after which it is not used


class StatusCache:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._entries: dict[str, CachedStatus] = {}
        self._reads: dict[str, asyncio.Future[CachedStatus | None]] = {}

    async def fetch(self, job_id: str, read: Callable[[], Awaitable[CachedStatus | None]]) -> CachedStatus | None:
        """The cached status, else ``read()``'s, one read at a time per job (later callers await the
        read in progress; the event loop's thread is the only caller, so this cannot race)."""
        entry = self.get(job_id)
        if entry is not None:
            return entry
        pending = self._reads.get(job_id)
        if pending is None:
            pending = asyncio.ensure_future(read())
            self._reads[job_id] = pending
            pending.add_done_callback(lambda _done: self._reads.pop(job_id, None))
        # shielded: a caller that goes away (client disconnect) does not cancel the others' read
        return await asyncio.shield(pending)

    def get(self, job_id: str) -> CachedStatus | None:
        entry = self._entries.get(job_id)
        if entry is None or entry.until <= time.monotonic():
            return None
        return entry

    def put(self, job_id: str, tenant: str, body: bytes) -> CachedStatus:
        entry = CachedStatus(tenant=tenant, body=body, until=time.monotonic() + self.seconds)
        if self.seconds > 0:
            if len(self._entries) >= SIZE:
                self._entries.clear()
            self._entries[job_id] = entry
        return entry

    def drop(self, job_id: str) -> None:
        self._entries.pop(job_id, None)

"""``AsyncSdQueue``: the client for asyncio backends (FastAPI, aiohttp, Starlette...).

A thin wrapper: every method runs the thread-safe sync client in a worker thread
(``asyncio.to_thread``), so an event loop never blocks on Redis, Celery or S3. Same methods as
``SdQueue``, awaitable::

    queue = AsyncSdQueue()
    handle = await queue.submit(Txt2ImgJob(prompt="a lighthouse"))
    result = await handle.wait(timeout=60)
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from sdqueue.client import Job, JobHandle, JobResult, Lane, SdQueue
from sdqueue.settings import Settings


class AsyncJobHandle:
    """An awaitable view of a ``JobHandle``."""

    def __init__(self, handle: JobHandle) -> None:
        self.sync = handle
        self.job_id = handle.job_id

    def __repr__(self) -> str:
        return f"AsyncJobHandle({self.job_id!r})"

    async def state(self) -> Any:
        """The job's state, as ``JobHandle.state``."""
        return await asyncio.to_thread(self.sync.state)

    async def progress(self) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.sync.progress)

    async def result(self) -> JobResult | None:
        return await asyncio.to_thread(self.sync.result)

    async def wait(self, timeout: float | None = 300.0) -> JobResult:
        """Wait for the end without blocking the loop (one thread sleeps on the result instead)."""
        return await asyncio.to_thread(self.sync.wait, timeout)

    async def cancel(self) -> None:
        await asyncio.to_thread(self.sync.cancel)


class AsyncSdQueue:
    """``SdQueue`` for asyncio: the same methods, awaitable. ``.sync`` is the wrapped client."""

    def __init__(self, settings: Settings | None = None, queue: SdQueue | None = None) -> None:
        self.sync = queue or SdQueue(settings)
        self.settings = self.sync.settings

    async def validate(self, job: Job | dict[str, Any]) -> Job:
        return await asyncio.to_thread(self.sync.validate, job)

    async def submit(self, job: Job | dict[str, Any], lane: Lane = "interactive") -> AsyncJobHandle:
        return AsyncJobHandle(await asyncio.to_thread(self.sync.submit, job, lane))

    def handle(self, job_id: str) -> AsyncJobHandle:
        return AsyncJobHandle(self.sync.handle(job_id))

    async def upload_input(self, source: str | os.PathLike[str] | bytes, prefix: str = "uploads") -> str:
        return await asyncio.to_thread(self.sync.upload_input, source, prefix)

    async def presigned_urls(self, result: JobResult, expires_s: int | None = None) -> list[str]:
        return await asyncio.to_thread(self.sync.presigned_urls, result, expires_s)

"""Task names, queue names and Redis keys: the wire contract with any Celery client."""

from __future__ import annotations

TXT2IMG_TASK = "sdqueue.txt2img"
IMG2IMG_TASK = "sdqueue.img2img"
INPAINT_TASK = "sdqueue.inpaint"
TASK_FOR_MODE = {"txt2img": TXT2IMG_TASK, "img2img": IMG2IMG_TASK, "inpaint": INPAINT_TASK}

INTERACTIVE_QUEUE = "sdqueue.interactive"
BULK_QUEUE = "sdqueue.bulk"
QUEUE_FOR_LANE = {"interactive": INTERACTIVE_QUEUE, "bulk": BULK_QUEUE}


def lane_queue(lane: str, model: str | None = None) -> str:
    """The queue of a lane: ``sdqueue.<lane>``, or ``sdqueue.<model>.<lane>`` for a job that names
    a model alias (each model's workers consume only their own model's queues)."""
    return QUEUE_FOR_LANE[lane] if model is None else f"sdqueue.{model}.{lane}"


def is_bulk_queue(name: str | None) -> bool:
    return bool(name) and (name == BULK_QUEUE or str(name).endswith(".bulk"))


NOTIFY_TASK = "sdqueue.notify"
NOTIFY_QUEUE = "sdqueue.notify"
"""Webhook deliveries: a task of their own, so retries wait in Redis and survive restarts."""

KEY_PREFIX = "sdq:"


def job_claim_key(job_id: str) -> str:
    """Submit-side idempotency claim for a job id."""
    return f"{KEY_PREFIX}job:{job_id}"


def deliveries_key(job_id: str, attempt: int) -> str:
    """How many times one message (job id + retry attempt) has been started."""
    return f"{KEY_PREFIX}deliveries:{job_id}:{attempt}"


def run_lease_key(job_id: str) -> str:
    """Held by the worker that is running a job right now."""
    return f"{KEY_PREFIX}running:{job_id}"


def notified_key(job_id: str) -> str:
    """Claimed by the delivery that announced the job's final outcome (notifications go out once)."""
    return f"{KEY_PREFIX}notified:{job_id}"


def cancel_key(job_id: str) -> str:
    """Set when a client cancels a job."""
    return f"{KEY_PREFIX}cancel:{job_id}"


def progress_key(job_id: str) -> str:
    """Latest denoising progress of a job."""
    return f"{KEY_PREFIX}progress:{job_id}"


def worker_alive_key(hostname: str) -> str:
    """Heartbeat of one worker process."""
    return f"{KEY_PREFIX}worker:{hostname}"


def model_loads_key(hostname: str) -> str:
    """Counts model loads of one worker (a test asserts it stays at one)."""
    return f"{KEY_PREFIX}model_loads:{hostname}"

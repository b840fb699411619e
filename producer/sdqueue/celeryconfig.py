"""Celery configuration shared by producers and workers.

Both sides build their app from this, so the transport options (visibility timeout above all:
the shortest one among a broker's clients wins) never disagree.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from sdqueue.names import BULK_QUEUE, INTERACTIVE_QUEUE, TASK_FOR_MODE
from sdqueue.settings import Settings

RESTORE_MUTEX_EXPIRE_S = 10
"""How long kombu's restore-sweep lock may outlive a worker killed while holding it (kombu's default
is 300 s: a kill -9 inside the 2-second sweep would hold back every redelivery for five minutes).
A sweep takes milliseconds, and each restore is a WATCH transaction, so two sweeps never restore
a message twice."""


def transport_options(settings: Settings) -> dict[str, Any]:
    """kombu Redis transport options: fast failure detection, bounded producer retries."""
    return {
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_restore_interval": 2,
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": RESTORE_MUTEX_EXPIRE_S,
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "socket_keepalive": True,
        "health_check_interval": 10,
        "retry_on_timeout": True,
        "max_retries": settings.submit_max_retries,
        "queue_order_strategy": "priority",
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """The full Celery configuration; see docs/reliability.md for why each value."""
    url = settings.redis_url.get_secret_value()
    options = transport_options(settings)
    config: dict[str, Any] = {
        "broker_url": url,
        "result_backend": url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_deduplicate_successful_tasks": True,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_track_started": True,
        "result_extended": True,
        "result_expires": settings.result_ttl_s,
        "result_backend_always_retry": True,
        "result_backend_max_retries": 10,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_connection_timeout": settings.redis_connect_timeout_s,
        "broker_transport_options": options,
        "result_backend_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_timeout": settings.redis_socket_timeout_s,
            "socket_connect_timeout": settings.redis_connect_timeout_s,
            "retry_policy": {"timeout": settings.redis_connect_timeout_s * 2},
        },
        "redis_socket_timeout": settings.redis_socket_timeout_s,
        "redis_socket_connect_timeout": settings.redis_connect_timeout_s,
        "redis_retry_on_timeout": True,
        "visibility_timeout": settings.visibility_timeout_s,
        "task_publish_retry_policy": {
            "max_retries": settings.submit_max_retries,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 1.0,
        },
        "task_queues": [
            Queue(name, Exchange(name, type="direct"), routing_key=name)
            for name in (INTERACTIVE_QUEUE, BULK_QUEUE)
        ],
        "task_default_queue": INTERACTIVE_QUEUE,
        "task_default_exchange": INTERACTIVE_QUEUE,
        "task_default_routing_key": INTERACTIVE_QUEUE,
        "task_routes": {task: {"queue": INTERACTIVE_QUEUE} for task in TASK_FOR_MODE.values()},
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # A cold shutdown (SIGQUIT) stops the running job at its next step and requeues it at once:
        # Celery's soft window would sleep its whole length whenever a job runs, however soon the
        # job ends. The warm shutdown (SIGTERM) is the one that lets jobs finish.
        "worker_soft_shutdown_timeout": 0.0,
    }
    if url.strip().lower().startswith("sentinel://"):  # Redis Sentinel: kombu and the backend ask it
        config["broker_transport_options"]["master_name"] = settings.redis_sentinel_master
        config["result_backend_transport_options"]["master_name"] = settings.redis_sentinel_master
    if url.startswith("rediss://"):
        config["broker_use_ssl"] = {"ssl_cert_reqs": "required"}
        config["redis_backend_use_ssl"] = {"ssl_cert_reqs": "required"}
    return config


def make_celery(settings: Settings, name: str = "sdqueue", include: list[str] | None = None) -> Celery:
    """A Celery app configured for sdqueue (no tasks registered: producers send by name)."""
    app = Celery(name, set_as_current=False, include=include or [])
    app.conf.update(celery_config(settings))
    return app

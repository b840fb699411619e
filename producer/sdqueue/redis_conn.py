"""A redis-py client for ``SDQ_REDIS_URL``: a plain ``redis://``/``rediss://`` URL, or Redis
Sentinel: ``sentinel://[:password@]host:port[/db];sentinel://host2:port;...`` with the master
named by ``SDQ_REDIS_SENTINEL_MASTER`` (the password and db, from the first URL, are the
master's). The client then asks the sentinels for the current master, and again after a failover.
Celery and kombu read the same URL (their ``sentinel://`` transport and result backend)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis
import redis.sentinel

from sdqueue.settings import Settings


def is_sentinel(url: str) -> bool:
    return url.strip().lower().startswith("sentinel://")


def sentinel_hosts(url: str) -> tuple[list[tuple[str, int]], str | None, int]:
    """``(hosts, password, db)`` of a ``;``-separated list of sentinel URLs."""
    hosts, password, db = [], None, 0
    for index, part in enumerate(p for p in url.split(";") if p.strip()):
        parts = urlsplit(part.strip())
        hosts.append((parts.hostname or "127.0.0.1", parts.port or 26379))
        if index == 0:
            password = parts.password
            db = int(parts.path.strip("/") or 0)
    return hosts, password, db


def redis_client(settings: Settings, **kwargs: Any) -> redis.Redis:
    """A client with the settings' timeouts; extra ``kwargs`` go to redis-py."""
    url = settings.redis_url.get_secret_value()
    options: dict[str, Any] = {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        **kwargs,
    }
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    hosts, password, db = sentinel_hosts(url)
    timeouts = {k: options[k] for k in ("socket_timeout", "socket_connect_timeout")}
    sentinel = redis.sentinel.Sentinel(hosts, sentinel_kwargs=timeouts, **timeouts)  # type: ignore[no-untyped-call]
    master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master, password=password, db=db, **options
    )
    return master

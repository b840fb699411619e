"""What the worker checks before it loads the model, so a misconfigured worker refuses to start
instead of burning GPU time or losing jobs silently. Each failure raises StartupError with the
setting to fix.

* Redis: an eviction policy that may drop keys without a TTL (``allkeys-*``: the queue lists
  themselves) is refused; so is a Redis that keeps nothing on disk (no AOF, no RDB snapshots),
  unless ``SDQ_ACCEPT_VOLATILE_BROKER=true`` says that losing queued jobs on a restart is
  accepted. Where CONFIG is not allowed (managed Redis) the worker says it could not check.
* The output buckets: a small probe object is written to each.
* The ready and heartbeat files: they must be writable.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import redis

from sdqueue.errors import StartupError, StorageUnavailable
from sdqueue.locations import ObjectRef
from sdqueue_worker.settings import WorkerSettings
from sdqueue_worker.storage import WorkerStorage

log = logging.getLogger(__name__)
EVICTING = ("allkeys-lru", "allkeys-lfu", "allkeys-random")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def redis_config(client: redis.Redis) -> dict[str, str] | None:
    """maxmemory-policy, appendonly and save, or None when CONFIG GET is not allowed."""
    try:
        found: dict[str, str] = {}
        for name in ("maxmemory-policy", "appendonly", "save"):
            for key, value in client.config_get(name).items():
                found[_text(key)] = _text(value)
        return found
    except redis.ResponseError as exc:
        log.warning("could not check Redis persistence and eviction (CONFIG GET refused: %s)", exc)
        return None
    except redis.RedisError as exc:
        raise StartupError(f"cannot reach Redis to check its settings: {exc}") from None


def check_redis(config: dict[str, str] | None, accept_volatile: bool) -> list[str]:
    """Refuse settings that lose jobs silently; returns what was found, for the log."""
    if config is None:
        return ["Redis settings not checked (CONFIG unavailable): make sure it persists and never evicts"]
    policy = config.get("maxmemory-policy", "")
    if policy in EVICTING:
        raise StartupError(
            f"Redis maxmemory-policy is {policy}: it may evict the queue itself and lose jobs silently. "
            "Set maxmemory-policy noeviction (redis.conf or CONFIG SET maxmemory-policy noeviction)"
        )
    persistent = config.get("appendonly") == "yes" or bool(config.get("save", "").strip())
    if not persistent and not accept_volatile:
        raise StartupError(
            "Redis keeps nothing on disk (appendonly no, save ''): a Redis restart loses every queued "
            "job and result. Turn on appendonly yes (or RDB snapshots), or set "
            "SDQ_ACCEPT_VOLATILE_BROKER=true to accept that"
        )
    found = [f"Redis maxmemory-policy {policy or '?'}, appendonly {config.get('appendonly', '?')}"]
    if policy.startswith("volatile-"):
        found.append(f"Redis {policy} may evict finished results before their TTL (the queue is safe)")
    if not persistent:
        found.append("Redis keeps nothing on disk: accepted by SDQ_ACCEPT_VOLATILE_BROKER")
    return found


def check_writable(path: str | None, setting: str) -> None:
    """Make sure the file can be created and written (removing it again if it was not there)."""
    if not path:
        return
    target = Path(path)
    existed = target.exists()
    try:
        with target.open("a"):
            pass
        if not existed:
            target.unlink()
    except OSError as exc:
        raise StartupError(
            f"{setting}={path}: cannot write it ({exc.strerror or exc}); fix the path"
        ) from None


def probe_outputs(storage: WorkerStorage, settings: WorkerSettings, hostname: str, attempts: int = 6) -> None:
    """Write a probe object into each allowed output bucket under the output prefix. Storage that
    cannot be reached yet is tried again (about 30 s in all); a refusal stops the start at once."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", hostname) or "worker"
    key = "/".join(p for p in (settings.output_prefix.strip("/"), ".sdqueue-probe", name) if p)
    for bucket in settings.allowed_output_buckets:
        for attempt in range(attempts):
            try:
                storage.probe_write(ObjectRef(bucket, key))
                break
            except StorageUnavailable as exc:
                if attempt + 1 == attempts:
                    raise StartupError(f"the worker cannot reach its output bucket: {exc}") from None
                log.warning("output bucket %s not reachable yet (%s); trying again", bucket, exc)
                time.sleep(min(2.0**attempt, 10.0))


def check_startup(
    settings: WorkerSettings, client: redis.Redis, storage: WorkerStorage, hostname: str
) -> None:
    """Every start-up check, cheapest first; raises StartupError."""
    check_writable(settings.ready_file, "SDQ_READY_FILE")
    check_writable(settings.heartbeat_file, "SDQ_HEARTBEAT_FILE")
    for line in check_redis(redis_config(client), settings.accept_volatile_broker):
        log.info("%s", line)
    probe_outputs(storage, settings, hostname)
    log.info("start-up checks passed (pid %d)", os.getpid())

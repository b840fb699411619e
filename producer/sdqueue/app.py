"""A torch-free Celery app for operators: ``celery -A sdqueue.app inspect ping|active|stats``
and ``celery -A sdqueue.app flower`` work with the base install.

It carries the same broker and transport settings as the worker and knows sdqueue's task names
(so Flower and ``inspect registered`` show them), but none of their implementations: those
are registered by the GPU worker's own app, ``sdqueue_worker.app``.
"""

from __future__ import annotations

from typing import Any

from sdqueue.celeryconfig import make_celery
from sdqueue.names import IMG2IMG_TASK, INPAINT_TASK, NOTIFY_TASK, TXT2IMG_TASK
from sdqueue.settings import get_settings

app = make_celery(get_settings(), "sdqueue")
TASK_NAMES = (TXT2IMG_TASK, IMG2IMG_TASK, INPAINT_TASK, NOTIFY_TASK)


def _declare(name: str) -> None:
    def runs_on_the_worker(*_: Any, **__: Any) -> None:
        raise RuntimeError(f"{name} runs on the sdqueue GPU worker (celery -A sdqueue_worker.app worker)")

    app.task(name=name, shared=False)(runs_on_the_worker)


for _name in TASK_NAMES:
    _declare(_name)

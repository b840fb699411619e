"""Run the app under uvicorn (``sdqueue serve``)."""

from __future__ import annotations

import uvicorn

from sdqueue.server.settings import get_server_settings


def serve(host: str | None, port: int | None, workers: int = 1) -> int:
    """Serve until SIGTERM/SIGINT; uvicorn drains open requests first."""
    settings = get_server_settings()
    uvicorn.run(
        "sdqueue.server.app:create_app",
        factory=True,
        host=host or settings.server_host,
        port=port or settings.server_port,
        workers=workers,
        access_log=False,
        proxy_headers=True,
        timeout_graceful_shutdown=30,
        log_level="info",
    )
    return 0

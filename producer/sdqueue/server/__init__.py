"""``sdqueue serve``: the HTTP front door (extra ``sdqueue[server]``).

A stateless FastAPI process that talks to Redis and S3 only: the native job API, uploads, live
progress (Server-Sent Events), OpenAI-compatible images endpoints, API keys with per-key quotas, and
a try-it page. ``create_app`` is in ``sdqueue.server.app``; this package module imports nothing
heavy, so ``sdqueue api-key`` works without the extra installed.
"""

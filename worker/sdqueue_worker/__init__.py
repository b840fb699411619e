"""The sdqueue GPU worker: Celery app, model runtime, batching GPU thread, image and storage I/O."""

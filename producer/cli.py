"""The ``sdqueue`` command line: submit, status, wait, cancel, worker, schema, tiny model."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

from producer.errors import SdqError

Handler = Callable[[argparse.Namespace], int]


def _queue() -> Any:
    from producer.client import SdQueue

    return SdQueue()


def _job_from_args(args: argparse.Namespace) -> dict[str, Any]:
    job: dict[str, Any] = {"mode": args.mode, "prompt": args.prompt}
    for name in ("negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "num_images",
                 "scheduler", "job_id", "image_url", "strength"):
        value = getattr(args, name, None)
        if value is not None:
            job[name] = value
    if args.output_bucket:
        job["output"] = {"bucket": args.output_bucket, "prefix": args.output_prefix or "outputs"}
    return job


def cmd_submit(args: argparse.Namespace) -> int:
    queue = _queue()
    handle = queue.submit(_job_from_args(args), lane=args.lane)
    if not args.wait:
        print(json.dumps({"job_id": handle.job_id, "state": handle.state()}))
        return 0
    result = handle.wait(timeout=args.timeout)
    urls = queue.presigned_urls(result)
    print(json.dumps({"job_id": result.job_id, "state": "succeeded",
                      "images": [{"url": i.url, "seed": i.seed, "http_url": u} for i, u in zip(result.images, urls)],
                      "manifest_url": result.manifest_url, "timings": result.timings}, indent=1))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    handle = _queue().handle(args.job_id)
    body: dict[str, Any] = {"job_id": args.job_id, "state": handle.state(), "progress": handle.progress()}
    try:
        result = handle.result()
        if result:
            body["images"] = [i.url for i in result.images]
    except SdqError as exc:
        body["error"] = str(exc)
    print(json.dumps(body, indent=1))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    result = _queue().handle(args.job_id).wait(timeout=args.timeout)
    print(json.dumps({"job_id": result.job_id, "images": [i.url for i in result.images]}, indent=1))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    _queue().handle(args.job_id).cancel()
    print(json.dumps({"job_id": args.job_id, "cancel": "requested"}))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from producer.contract import job_json_schema

    print(json.dumps(job_json_schema(), indent=1, sort_keys=True))
    return 0


def cmd_build_tiny_model(args: argparse.Namespace) -> int:
    from worker.tiny_model import build_tiny_model

    print(build_tiny_model(args.path, force=args.force))
    return 0


def worker_argv(name: str | None, loglevel: str) -> list[str]:
    """The celery command line for one single-GPU worker, every delivery flag explicit."""
    from producer.names import BULK_QUEUE, INTERACTIVE_QUEUE
    from producer.settings import get_settings

    settings = get_settings()
    slots = 1 if settings.max_batch == 1 else 2 * settings.max_batch
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool", "threads",
            "--concurrency", str(slots), "--prefetch-multiplier", "1", "--queues",
            f"{INTERACTIVE_QUEUE},{BULK_QUEUE}", "--task-events", "--without-gossip", "--without-mingle",
            "--loglevel", loglevel]
    return argv + (["--hostname", name] if name else [])


def cmd_worker(args: argparse.Namespace) -> int:
    argv = worker_argv(args.name, args.loglevel)
    os.execv(argv[0], argv)
    return 0  # not reached


def _submit_parser(sub: Any) -> None:
    p = sub.add_parser("submit", help="validate and enqueue one job")
    p.add_argument("mode", choices=["txt2img", "img2img"])
    p.add_argument("prompt")
    p.add_argument("--negative-prompt", dest="negative_prompt")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", dest="guidance_scale", type=float)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--num-images", dest="num_images", type=int)
    p.add_argument("--scheduler")
    p.add_argument("--job-id", dest="job_id", help="idempotency key: the same id twice runs once")
    p.add_argument("--image-url", dest="image_url", help="img2img input: s3://bucket/key")
    p.add_argument("--strength", type=float)
    p.add_argument("--output-bucket", dest="output_bucket")
    p.add_argument("--output-prefix", dest="output_prefix")
    p.add_argument("--lane", choices=["interactive", "bulk"], default="interactive")
    p.add_argument("--wait", action="store_true", help="wait and print the result with presigned URLs")
    p.add_argument("--timeout", type=float, default=300.0)
    p.set_defaults(func=cmd_submit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdqueue", description="Stable Diffusion job queue (Celery + Redis + S3).")
    sub = parser.add_subparsers(dest="command", required=True)
    _submit_parser(sub)
    for name, func, text in (("status", cmd_status, "state, progress and result of a job"),
                             ("wait", cmd_wait, "wait for a job and print its images"),
                             ("cancel", cmd_cancel, "cancel a queued or running job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id")
        p.add_argument("--timeout", type=float, default=300.0)
        p.set_defaults(func=func)
    p = sub.add_parser("worker", help="run one GPU worker (settings from SDQ_* environment)")
    p.add_argument("--name", help="Celery node name (default: celery@hostname)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("schema", help="print the JSON Schema of the job payload")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("build-tiny-model", help="build the tiny random SD pipeline used by tests and the demo")
    p.add_argument("path", nargs="?", default=".cache/tiny-sd")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_build_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SdqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

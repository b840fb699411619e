"""The ``sdqueue`` command line: submit, status, wait, cancel, bulk, worker, schema, tiny model."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

import redis
from kombu.exceptions import OperationalError

from sdqueue.errors import (
    JobCancelled,
    JobFailed,
    JobIdConflict,
    JobNotFound,
    JobValidationError,
    SdqError,
    TransientError,
    WaitTimeout,
)
from sdqueue.states import JobState

Handler = Callable[[argparse.Namespace], int]
EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_UNREACHABLE, EXIT_UNKNOWN = 0, 1, 2, 3, 4
EXIT_CODES = """\
exit codes: 0 ok (for status: the job is queued, running, retrying or succeeded),
  1 the job failed or was cancelled (or, for wait, did not finish within --timeout),
  2 invalid input, 3 Redis or S3 unreachable, 4 unknown job id (never submitted, or forgotten)"""

DESCRIPTION = """\
Stable Diffusion job queue: producers enqueue txt2img/img2img jobs through Celery to Redis;
one GPU worker loads the model once and writes PNGs plus a manifest to S3.
Settings come from SDQ_* environment variables (SDQ_REDIS_URL, SDQ_S3_ENDPOINT_URL, ...)."""

EPILOG = (
    """\
examples:
  sdqueue submit txt2img "a lighthouse at dusk" --seed 7 --wait
  sdqueue submit img2img "as a watercolour" --image photo.png --strength 0.5
  sdqueue status 3f2a...            state, progress and images of a job
  sdqueue cancel 3f2a...            a queued job never runs; a running one stops at its next step
  sdqueue bulk prompts.csv --max-in-flight 200 --report report.jsonl
  sdqueue download report.jsonl out/  fetch a bulk run's images
  sdqueue worker --name gpu0@host   run the GPU worker (model from SDQ_MODEL)
  sdqueue serve --port 8000         the HTTP front door (pip install "sdqueue[server]")

"""
    + EXIT_CODES
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdqueue")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _queue() -> Any:
    from sdqueue.client import SdQueue

    return SdQueue()


def _print(body: Any, indent: int | None = 1, stream: TextIO | None = None) -> None:
    print(json.dumps(body, indent=indent), file=stream or sys.stdout)


SPEC_OPTIONS = (
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "width",
    "height",
    "num_images",
    "scheduler",
    "job_id",
    "image_url",
    "mask_url",
    "strength",
    "output_format",
    "output_quality",
    "output_lossless",
    "model",
    "webhook_url",
    "callback_task",
    "callback_queue",
)


def _job_from_args(args: argparse.Namespace) -> dict[str, Any]:
    job: dict[str, Any] = {"mode": args.mode, "prompt": args.prompt}
    job.update({name: getattr(args, name) for name in SPEC_OPTIONS if getattr(args, name, None) is not None})
    if getattr(args, "lora", None):
        job["loras"] = [_lora(text) for text in args.lora]
    if args.output_bucket:
        job["output"] = {"bucket": args.output_bucket, "prefix": args.output_prefix or ""}
    return job


def _lora(text: str) -> dict[str, Any]:
    """``name`` or ``name:scale`` from ``--lora``."""
    name, _, scale = text.partition(":")
    try:
        return {"name": name, "scale": float(scale)} if scale else {"name": name}
    except ValueError:
        raise JobValidationError(f"--lora {text}: the scale after ':' must be a number") from None


def _failure(job_id: str, exc: JobFailed) -> int:
    state = JobState.CANCELLED if isinstance(exc, JobCancelled) else JobState.FAILED
    _print({"job_id": job_id, "state": state.value, "error": exc.reason, "error_type": exc.error_type})
    return EXIT_FAILED


def _waited(handle: Any, timeout: float) -> Any:
    """``handle.wait``; an expected end other than success becomes (None, exit code), printed."""
    try:
        return handle.wait(timeout=timeout), EXIT_OK
    except JobFailed as exc:
        return None, _failure(handle.job_id, exc)
    except WaitTimeout as exc:
        _print({"job_id": handle.job_id, "state": handle.state().value, "error": str(exc)})
        return None, EXIT_FAILED
    except JobNotFound as exc:
        _print({"job_id": handle.job_id, "state": JobState.UNKNOWN.value, "error": str(exc)})
        return None, EXIT_UNKNOWN


def cmd_submit(args: argparse.Namespace) -> int:
    queue = _queue()
    job = _job_from_args(args)
    if getattr(args, "image", None):
        if args.image_url:
            raise JobValidationError("image_url: give --image or --image-url, not both")
        job["image_url"] = queue.upload_input(args.image)
    handle = queue.submit(job, lane=args.lane)
    if not args.wait:
        _print({"job_id": handle.job_id, "state": handle.state().value}, indent=None)
        return EXIT_OK
    result, code = _waited(handle, args.timeout)
    if result is None:
        return int(code)
    urls = queue.presigned_urls(result)
    _print(
        {
            "job_id": result.job_id,
            "state": "succeeded",
            "images": [
                {"url": i.url, "seed": i.seed, "http_url": u}
                for i, u in zip(result.images, urls, strict=False)
            ],
            "manifest_url": result.manifest_url,
            "timings": result.timings,
        }
    )
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    handle = _queue().handle(args.job_id)
    state = handle.state()
    body: dict[str, Any] = {"job_id": args.job_id, "state": state.value, "progress": handle.progress()}
    try:
        result = handle.result()
        if result:
            body["images"] = [i.url for i in result.images]
    except JobFailed as exc:
        body["error"] = exc.reason
    _print(body)
    if state is JobState.UNKNOWN:
        return EXIT_UNKNOWN
    return EXIT_FAILED if state in (JobState.FAILED, JobState.CANCELLED) else EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    result, code = _waited(_queue().handle(args.job_id), args.timeout)
    if result is None:
        return int(code)
    _print({"job_id": result.job_id, "state": "succeeded", "images": [i.url for i in result.images]})
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    _queue().handle(args.job_id).cancel()
    _print({"job_id": args.job_id, "cancel": "requested"}, indent=None)
    return EXIT_OK


def cmd_bulk(args: argparse.Namespace) -> int:
    from sdqueue.bulk_cli import run_bulk_command

    return run_bulk_command(args, _queue())


def cmd_download(args: argparse.Namespace) -> int:
    from sdqueue.bulk_cli import download_command

    return download_command(_queue(), args.report, args.dir, args.silent, max(1, args.workers))


def cmd_cleanup(args: argparse.Namespace) -> int:
    from sdqueue.cleanup import delete_folders, parse_age, plan_cleanup
    from sdqueue.settings import get_settings
    from sdqueue.storage import make_s3_client

    settings = get_settings()
    age = parse_age(args.older_than)
    bucket = args.bucket or settings.output_bucket
    prefix = settings.output_prefix if args.prefix is None else args.prefix
    client = make_s3_client(settings)
    plan = plan_cleanup(client, bucket, prefix, age)
    for folder, when in plan.manifest_time.items():
        print(
            f"{'delete' if args.yes else 'would delete'} s3://{bucket}/{folder}/ (manifest {when.isoformat()})"
        )
    deleted = delete_folders(client, bucket, plan) if args.yes else 0
    summary = {
        "bucket": bucket,
        "prefix": prefix,
        "older_than": args.older_than,
        "dry_run": not args.yes,
        "old_folders": len(plan.old),
        "objects_deleted": deleted,
        "objects_to_delete": plan.object_count,
        "kept_recent": plan.kept_recent,
        "kept_without_manifest": plan.kept_without_manifest,
    }
    _print(summary, stream=sys.stderr)
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from sdqueue.contract import job_json_schema

    print(json.dumps(job_json_schema(), indent=1, sort_keys=True))
    return EXIT_OK


class WorkerNotInstalled(SdqError):
    """A worker command was run where only the client is installed."""


class ServerNotInstalled(SdqError):
    """``sdqueue serve`` was run without the server extra."""


WORKER_PACKAGES = ("sdqueue_worker", "torch", "diffusers", "transformers")
"""What a worker command needs beyond the client (the ``worker`` extra)."""


def _absent(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except ImportError:
        return True


def _worker_side(module: str) -> Any:
    """Import a module of the worker package, or say how to install it."""
    missing = [name for name in WORKER_PACKAGES if _absent(name)]
    try:
        if not missing:
            return importlib.import_module(module)
    except ImportError as exc:
        if not exc.name or exc.name.split(".")[0] not in WORKER_PACKAGES:
            raise
        missing = [exc.name]
    raise WorkerNotInstalled(
        f'this command needs the GPU worker ({", ".join(missing)} missing): pip install "sdqueue[worker]"'
    ) from None


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from sdqueue.server.run import serve
    except ImportError as exc:
        raise ServerNotInstalled(
            f'sdqueue serve needs the server extra ({exc.name} is missing): pip install "sdqueue[server]"'
        ) from None
    return serve(args.host, args.port, args.workers)


def cmd_api_key(args: argparse.Namespace) -> int:
    from sdqueue.server.keys import new_key_line

    key, line = new_key_line(args.name, args.lane)
    _print({"api_key": key, "SDQ_API_KEYS entry": line}, indent=1)
    return EXIT_OK


def cmd_build_tiny_model(args: argparse.Namespace) -> int:
    print(_worker_side("sdqueue_worker.tiny_model").build_tiny_model(args.path, force=args.force))
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    return int(_worker_side("sdqueue_worker.launch").run_worker(args.gpus, args.name, args.loglevel))


def cmd_notifier(args: argparse.Namespace) -> int:
    launch = _worker_side("sdqueue_worker.launch")
    return int(launch.run_notifier(args.name, args.loglevel, args.concurrency))


def _parser(sub: Any, name: str, func: Handler, help_text: str, description: str, epilog: str = "") -> Any:
    parser = sub.add_parser(
        name,
        help=help_text,
        description=description,
        epilog=epilog or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=func)
    return parser


def _spec_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job spec (defaults and limits: sdqueue schema)")
    g.add_argument("--negative-prompt", dest="negative_prompt", metavar="TEXT")
    g.add_argument("--seed", type=int, help="base seed; image i gets seed+i (default: from the job id)")
    g.add_argument("--steps", type=int, help="denoising steps (default 30)")
    g.add_argument("--guidance-scale", dest="guidance_scale", type=float, metavar="G", help="default 7.5")
    g.add_argument("--width", type=int, help="pixels, a multiple of 8 (default 512)")
    g.add_argument("--height", type=int, help="pixels, a multiple of 8 (default 512)")
    g.add_argument("--num-images", dest="num_images", type=int, metavar="N", help="images of this job (1-8)")
    g.add_argument("--scheduler", help="e.g. euler_a, dpmpp_2m_karras, dpmpp_sde (all: docs/features.md)")
    g.add_argument("--image-url", dest="image_url", metavar="URL", help="img2img input: s3://bucket/key")
    g.add_argument("--mask-url", dest="mask_url", metavar="URL", help="inpaint mask (white repaints)")
    g.add_argument(
        "--image", metavar="PATH", help="img2img input file: checked, uploaded to the first input bucket"
    )
    g.add_argument("--strength", type=float, help="img2img: how far from the input (0-1, default 0.6)")
    g.add_argument("--output-format", dest="output_format", choices=["png", "webp", "jpeg"])
    g.add_argument("--output-quality", dest="output_quality", type=int, metavar="Q", help="webp/jpeg 1-100")
    g.add_argument("--output-lossless", dest="output_lossless", action="store_true", default=None)
    g.add_argument("--lora", action="append", metavar="NAME[:SCALE]", help="LoRA adapter (repeatable)")
    g.add_argument(
        "--model", metavar="ALIAS", help="model alias from SDQ_MODELS (default: the default model)"
    )
    g.add_argument("--job-id", dest="job_id", help="idempotency key: the same id twice runs once")
    g.add_argument("--output-bucket", dest="output_bucket", metavar="BUCKET")
    g.add_argument("--output-prefix", dest="output_prefix", metavar="PREFIX")
    n = p.add_argument_group("completion notification")
    n.add_argument(
        "--webhook-url",
        dest="webhook_url",
        metavar="URL",
        help="signed POST when the job ends (host must be in SDQ_WEBHOOK_HOSTS)",
    )
    n.add_argument(
        "--callback-task",
        dest="callback_task",
        metavar="TASK",
        help="Celery task of your own worker, sent {job_id, state, result|error}",
    )
    n.add_argument(
        "--callback-queue", dest="callback_queue", metavar="QUEUE", help="its queue (default celery)"
    )


def _submit_parser(sub: Any) -> None:
    p = _parser(
        sub,
        "submit",
        cmd_submit,
        "validate and enqueue one job",
        "Validate a job against the contract and enqueue it; prints its id at once,\n"
        "or with --wait its images (s3:// and presigned http URLs) when it is done.",
        'examples:\n  sdqueue submit txt2img "a red fox" --seed 7 --steps 25 --wait\n'
        '  sdqueue submit img2img "in snow" --image fox.png --strength 0.4    # uploads fox.png first\n'
        '  sdqueue submit img2img "in snow" --image-url s3://sdqueue/uploads/fox.png\n'
        '  sdqueue submit txt2img "a fox" --job-id fox-1   # resubmitting fox-1 runs nothing new',
    )
    p.add_argument("mode", choices=["txt2img", "img2img", "inpaint"])
    p.add_argument("prompt")
    _spec_options(p)
    p.add_argument(
        "--lane",
        choices=["interactive", "bulk"],
        default="interactive",
        help="queue: interactive jobs are always taken before bulk ones (default interactive)",
    )
    p.add_argument("--wait", action="store_true", help="wait and print the result with presigned URLs")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits (default 300)")


BULK_DESCRIPTION = """\
Submit every job of FILE (JSONL: one job object a line; CSV: a header of job fields, cells
typed by the contract, output.bucket/output.prefix for the output) and follow them to the end.
The file is streamed: any length, flat memory. Bad lines are reported with their line numbers
and the good ones still run (--strict: check the whole file first, submit nothing if any is bad).

Resume by content: each line's job id is its job_id column, else a hash of its normalised spec
(plus --run-name), so running an edited file again runs only new or changed lines; finished
jobs are skipped and jobs still queued are followed. Repeated lines run once (--duplicates each:
every copy, each its own job and seed).

Never more than --max-in-flight jobs of this run are unfinished, and no job is added while the
lane's Redis list already holds that many (so several runs side by side share the cap).
--report writes each line's job id, state, prompt, image URLs, seeds and error as results arrive.
Progress goes to stderr; the summary (JSON) to stdout. Details: docs/bulk.md."""

BULK_EPILOG = """\
examples:
  sdqueue bulk jobs.jsonl --report report.jsonl
  sdqueue bulk prompts.csv --mode txt2img --max-in-flight 500 --report index.csv
  sdqueue bulk prompts.csv --run-name v2 --download out/     # a fresh set of ids, then fetch
  sdqueue download report.jsonl out/                         # fetch (again: skips what is there)
  generate_jobs | sdqueue bulk - --dry-run                    # validate only, print job ids

exit codes: 0 all succeeded (or, with --no-wait, all queued), 1 some failed, cancelled,
unfinished or not submitted, 2 some line invalid (the valid ones still ran, unless --strict),
3 Redis unreachable, 130 interrupted (run it again to resume)"""


def _bulk_parser(sub: Any) -> None:
    p = _parser(
        sub,
        "bulk",
        cmd_bulk,
        "run every job of a JSONL or CSV file: resume by content, results index, download",
        BULK_DESCRIPTION,
        BULK_EPILOG,
    )
    p.add_argument("file", help="job file, or - for stdin")
    p.add_argument("--format", choices=["jsonl", "csv"], help="default: csv for *.csv, else jsonl")
    p.add_argument("--mode", choices=["txt2img", "img2img", "inpaint"], help="mode of lines that name none")
    p.add_argument("--lane", choices=["interactive", "bulk"], default="bulk", help="queue (default bulk)")
    p.add_argument(
        "--max-in-flight",
        dest="max_in_flight",
        type=int,
        default=100,
        metavar="N",
        help="most jobs of this run unfinished, and most messages on the lane before adding (default 100)",
    )
    p.add_argument("--run-name", dest="run_name", metavar="NAME", help="part of every content-hash job id")
    p.add_argument(
        "--duplicates",
        choices=["once", "each"],
        default="once",
        help="repeated lines: run once and report the copies (default), or run each copy",
    )
    p.add_argument(
        "--strict", action="store_true", help="validate the whole file first; any bad line: exit 2"
    )
    p.add_argument(
        "--report", metavar="PATH", help="results index, one record a line (JSONL, or CSV for *.csv)"
    )
    p.add_argument("--report-format", dest="report_format", choices=["jsonl", "csv"], help="override")
    p.add_argument("--presign", action="store_true", help="add presigned http URLs to the report")
    p.add_argument(
        "--download",
        metavar="DIR",
        help="then fetch the images into DIR (report in DIR/report.jsonl if none)",
    )
    p.add_argument(
        "--upload-bucket",
        dest="upload_bucket",
        metavar="BUCKET",
        help="where local img2img inputs go (default: the first of SDQ_INPUT_BUCKETS)",
    )
    p.add_argument(
        "--retry-failed",
        dest="retry_failed",
        action="store_true",
        help="run again the jobs that failed in an earlier run of this file",
    )
    p.add_argument(
        "--dry-run",
        dest="dry_run",
        action="store_true",
        help="validate every line and print the job ids; submit nothing",
    )
    p.add_argument("--no-wait", dest="no_wait", action="store_true", help="enqueue everything, then exit")
    p.add_argument(
        "--timeout", type=float, metavar="S", help="stop following after S seconds (the jobs go on)"
    )
    p.add_argument(
        "--poll-interval",
        dest="poll_s",
        type=float,
        default=0.2,
        metavar="S",
        help="seconds between state checks (default 0.2)",
    )
    p.add_argument("--silent", action="store_true", help="no progress bar (errors still shown)")
    p.add_argument(
        "--sent-events",
        dest="sent_events",
        action="store_true",
        help="publish through Celery with its task-sent event per job, so Flower lists jobs while "
        "queued (off by default: enqueue is several times slower and Flower's task list fills up)",
    )


def _download_parser(sub: Any) -> None:
    p = _parser(
        sub,
        "download",
        cmd_download,
        "fetch the images of a bulk report into a folder",
        "Fetch every image of the succeeded lines of REPORT (written by sdqueue bulk --report)\n"
        "into DIR as {job_id}_{index}.png. Resumable: files already there are skipped.",
        "example:\n  sdqueue download report.jsonl out/\n\nexit codes: 0 all there, 1 some failed",
    )
    p.add_argument("report", help="a bulk report (JSONL, or CSV for *.csv)")
    p.add_argument("dir", help="target folder (created if missing)")
    p.add_argument("--workers", type=int, default=8, help="parallel fetches (default 8)")
    p.add_argument("--silent", action="store_true", help="no progress bar")


def _job_id_parsers(sub: Any) -> None:
    for name, func, text, description in (
        (
            "status",
            cmd_status,
            "state, progress and result of a job",
            "Print a job's state (queued, running, retrying, succeeded, failed, cancelled,\n"
            "unknown), its latest denoising progress, and its images or error. A finished job\n"
            "whose result expired is read from its manifest in S3.",
        ),
        (
            "wait",
            cmd_wait,
            "wait for a job and print its images",
            "Block until a job ends and print its images (or its error).",
        ),
        (
            "cancel",
            cmd_cancel,
            "cancel a queued or running job",
            "Cancel a job: a queued one never runs; a running one stops at its next denoising\n"
            "step, ends cancelled and writes no manifest.",
        ),
    ):
        epilog = f"example:\n  sdqueue {name} 3f2a9c..."
        if name != "cancel":
            epilog += "\n\n" + EXIT_CODES
        p = _parser(sub, name, func, text, description, epilog)
        p.add_argument("job_id")
        if name == "wait":
            p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")


def _other_parsers(sub: Any) -> None:
    p = _parser(
        sub,
        "worker",
        cmd_worker,
        "run one GPU worker (settings from SDQ_* environment)",
        "Run the Celery worker for one GPU: threads pool, prefetch 1, task events on,\n"
        "queues sdqueue.interactive, sdqueue.bulk (in that order; webhooks: sdqueue notifier).\n"
        "The model (SDQ_MODEL) loads once at start; SDQ_METRICS_PORT serves Prometheus metrics.",
        "example:\n  SDQ_MODEL=stable-diffusion-v1-5/stable-diffusion-v1-5 SDQ_METRICS_PORT=9808 \\\n"
        "    sdqueue worker --name gpu0@$(hostname)",
    )
    p.add_argument("--name", help="Celery node name (default: celery@hostname)")
    p.add_argument("--gpus", help="one single-concurrency worker per GPU on this host: 'all' or ids like 0,1")
    p.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING... (default INFO)")
    p = _parser(
        sub,
        "serve",
        cmd_serve,
        "run the HTTP front door (native API, OpenAI-compatible images API, try-it page)",
        "Serve the HTTP API (docs/server.md): /v1/jobs, /v1/uploads, /v1/images/generations,\n"
        "/v1/images/edits, OpenAPI at /openapi.json and a try-it page at /. Stateless: it talks to\n"
        "Redis and S3 only, so any number can run behind a load balancer. API keys: SDQ_API_KEYS\n"
        "or SDQ_API_KEYS_FILE (none set: open, for development only).",
        "example:\n  sdqueue serve --host 0.0.0.0 --port 8000",
    )
    p.add_argument("--host", help="address to bind (default SDQ_SERVER_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default SDQ_SERVER_PORT, 8000)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    p = _parser(
        sub,
        "api-key",
        cmd_api_key,
        "make a new API key for sdqueue serve",
        "Print a new random API key and the SDQ_API_KEYS entry (name:sha256[:lane]) that admits it.\n"
        "Only the hash goes into the settings; give the key itself to the tenant.",
        "example:\n  sdqueue api-key alice --lane bulk",
    )
    p.add_argument("name", help="tenant name: lowercase letters, digits and '-' (1-32)")
    p.add_argument("--lane", choices=["interactive", "bulk"], help="bind the key to one lane")
    p = _parser(
        sub,
        "cleanup",
        cmd_cleanup,
        "delete job folders older than an age (dry run unless --yes)",
        "Delete the job folders (<prefix>/<job_id>/: images and manifest) whose manifest is\n"
        "older than --older-than, for object stores without a lifecycle rule (docs/deploy.md).\n"
        "Folders without a manifest are kept. Prints the plan; deletes only with --yes.",
        "examples:\n  sdqueue cleanup --older-than 30d          # dry run: what would go\n"
        "  sdqueue cleanup --older-than 30d --yes",
    )
    p.add_argument("--older-than", dest="older_than", required=True, metavar="AGE", help="30d, 12h, 2w...")
    p.add_argument("--bucket", help="default SDQ_OUTPUT_BUCKET")
    p.add_argument("--prefix", help="default SDQ_OUTPUT_PREFIX (outputs)")
    p.add_argument("--yes", action="store_true", help="delete (without it: dry run)")
    p = _parser(
        sub,
        "notifier",
        cmd_notifier,
        "deliver webhooks (CPU only, queue sdqueue.notify)",
        "Run the webhook notifier: a CPU-only Celery worker consuming sdqueue.notify, so slow\n"
        "webhook receivers never hold a GPU job slot. Needs SDQ_WEBHOOK_SECRET and\n"
        "SDQ_WEBHOOK_HOSTS like the worker; never loads the model.",
        "example:\n  SDQ_WEBHOOK_SECRET=whsec_... sdqueue notifier --name notifier@$(hostname)",
    )
    p.add_argument("--name", help="Celery node name (default: celery@hostname)")
    p.add_argument("--concurrency", type=int, help="deliveries at once (default SDQ_NOTIFY_CONCURRENCY, 8)")
    p.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING... (default INFO)")
    _parser(
        sub,
        "schema",
        cmd_schema,
        "print the JSON Schema of the job payload",
        "Print the JSON Schema of the task kwargs, for producers in other languages.",
    )
    p = _parser(
        sub,
        "build-tiny-model",
        cmd_build_tiny_model,
        "build the tiny random SD pipeline used by tests and the demo",
        "Build a tiny randomly initialised SD pipeline (same code path as SD 1.x) and save it.",
    )
    p.add_argument("path", nargs="?", default=".cache/tiny-sd")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build is there")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdqueue",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sdqueue {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _submit_parser(sub)
    _job_id_parsers(sub)
    _bulk_parser(sub)
    _download_parser(sub)
    _other_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (JobValidationError, JobIdConflict) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except TransientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (redis.RedisError, OperationalError) as exc:
        print(f"error: cannot reach Redis: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except JobNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN
    except (JobFailed, WaitTimeout, SdqError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

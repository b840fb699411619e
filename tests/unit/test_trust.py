"""The pure checks behind "the worker trusts nothing it is handed": job ids, output folders,
input URLs, webhook host:port, callback allow-lists, strict numbers, derived seeds, Redis
settings, JPEG scans and capped errors. Each runs in milliseconds, without services."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdqueue.contract import MAX_DERIVED_SEED, MAX_SEED, Txt2ImgJob, derived_seed, parse_job
from sdqueue.errors import InputImageError, JobValidationError, StartupError
from sdqueue.locations import parse_object_url
from sdqueue.policy import check_callback
from sdqueue.webhooks import check_webhook_url, service_netlocs
from sdqueue_worker.backend import cap
from sdqueue_worker.checks import check_redis, check_writable
from sdqueue_worker.images import decode_input_image, jpeg_scans
from sdqueue_worker.settings import WorkerSettings
from sdqueue_worker.work import parse_message

GOOD = {"prompt": "a harbour", "width": 64, "height": 64, "steps": 2}
SETTINGS = WorkerSettings(
    output_prefix="outputs", callback_tasks=["webapp.done"], callback_queues=["celery", "webapp"]
)


def message(job_id: Any = "job-1", task: str = "sdqueue.txt2img", args: Any = (), **kwargs: Any):  # type: ignore[no-untyped-def]
    return parse_message(task, job_id, args, {**GOOD, **kwargs}, None, SETTINGS)


@pytest.mark.parametrize(
    "job_id", ["../../escaped", "a/b", "x" * 129, "new\nline", "naïve", "", " lead", None, 42]
)
def test_task_ids_outside_the_job_id_pattern_are_refused(job_id: Any) -> None:
    with pytest.raises(JobValidationError, match="task id"):
        message(job_id)


def test_a_refused_id_is_never_echoed_whole() -> None:
    with pytest.raises(JobValidationError) as info:
        message("/" * 10_000)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize(
    ("output", "key"),
    [
        (None, "outputs/job-1"),
        ({"bucket": "sdqueue"}, "outputs/job-1"),
        ({"bucket": "sdqueue", "prefix": "team/a"}, "outputs/team/a/job-1"),
        ({"bucket": "sdqueue", "prefix": "/inputs/"}, "outputs/inputs/job-1"),
    ],
)
def test_output_folders_stay_under_the_configured_prefix(output: Any, key: str) -> None:
    extra = {"output": output} if output else {}
    assert message(**extra).folder.key == key


@pytest.mark.parametrize("prefix", ["./outputs/./", "a/../b", "a//b", ".", ".."])
def test_dot_and_empty_segments_in_an_output_prefix_are_refused(prefix: str) -> None:
    with pytest.raises(JobValidationError, match="prefix"):
        message(output={"bucket": "sdqueue", "prefix": prefix})


def test_positional_args_get_a_hint_to_send_kwargs() -> None:
    with pytest.raises(JobValidationError, match="keyword arguments"):
        message(args=["a harbour"])


def test_task_name_and_mode_must_agree() -> None:
    with pytest.raises(JobValidationError, match="mode"):
        message(mode="img2img")
    assert message(mode="txt2img").mode == "txt2img"


@pytest.mark.parametrize(
    "url",
    ["s3://sdqueue/inputs/a#b.png", "s3://sdqueue/inputs/a.png?versionId=1", "s3://sdqueue/inputs/a?.png"],
)
def test_input_urls_with_fragments_or_queries_are_refused(url: str) -> None:
    with pytest.raises(InputImageError, match="queries and fragments"):
        parse_object_url(url, None)
    assert parse_object_url("s3://sdqueue/inputs/a%23b.png", None).key == "inputs/a#b.png"


def test_an_out_of_range_port_names_the_field() -> None:
    with pytest.raises(InputImageError, match="image_url .*port"):
        parse_object_url("http://127.0.0.1:99999/sdqueue/a.png", "http://127.0.0.1:9000")
    with pytest.raises(JobValidationError, match="webhook_url .*port"):
        check_webhook_url("http://127.0.0.1:70000/hook", ["127.0.0.1"])


def test_a_bare_webhook_host_means_the_default_port_only() -> None:
    assert check_webhook_url("http://hooks.example.com/in", ["hooks.example.com"])
    assert check_webhook_url("https://hooks.example.com/in", ["hooks.example.com"])
    for url in ("http://hooks.example.com:6379/", "https://hooks.example.com:8443/"):
        with pytest.raises(JobValidationError, match="not allowed for webhooks"):
            check_webhook_url(url, ["hooks.example.com"])
    assert check_webhook_url("http://127.0.0.1:8080/in", ["127.0.0.1:8080"])


def test_the_brokers_address_is_never_a_webhook_target() -> None:
    forbidden = service_netlocs(["redis://:pw@127.0.0.1:6379/0"])
    with pytest.raises(JobValidationError, match="own Redis"):
        check_webhook_url("http://127.0.0.1:6379/", ["127.0.0.1:6379"], forbidden)


def test_callback_names_and_queues_come_from_allow_lists() -> None:
    check_callback("webapp.done", "webapp", SETTINGS)
    check_callback("webapp.done", None, SETTINGS)
    with pytest.raises(JobValidationError, match="callback_task 'sdqueue.txt2img'"):
        check_callback("sdqueue.txt2img", None, SETTINGS)
    with pytest.raises(JobValidationError, match="callback_queue 'sdqueue.interactive'"):
        check_callback("webapp.done", "sdqueue.interactive", SETTINGS)
    with pytest.raises(JobValidationError, match="callback_task"):
        message(callback_task="other.task")


@pytest.mark.parametrize("field", ["guidance_scale", "strength"])
@pytest.mark.parametrize("value", ["7.5", True, "0.5"])
def test_float_fields_refuse_strings_and_booleans(field: str, value: Any) -> None:
    payload = {**GOOD, "mode": "img2img", "image_url": "s3://sdqueue/a.png", field: value}
    with pytest.raises(JobValidationError, match=field):
        parse_job(payload)
    assert parse_job({**payload, field: 1}).model_dump()[field] == 1.0


def test_validation_errors_are_capped() -> None:
    with pytest.raises(JobValidationError) as info:
        parse_job({**GOOD, "mode": "txt2img", **{f"k{i}": i for i in range(10_000)}})
    assert "more problems" in str(info.value) and len(str(info.value)) < 3000
    with pytest.raises(JobValidationError) as info:
        parse_job({**GOOD, "mode": "txt2img", "prompt": "x" * 1_000_000})
    assert len(str(info.value)) < 500
    assert len(cap("y" * 100_000)) < 2100


def test_derived_seeds_fit_in_53_bits_and_explicit_seeds_keep_63() -> None:
    seeds = [derived_seed(f"job-{i}") for i in range(2000)]
    assert max(seeds) <= MAX_DERIVED_SEED and max(seeds) > 2**50
    assert all(json.loads(json.dumps(float(seed))) == seed for seed in seeds)  # a double holds them
    assert Txt2ImgJob(prompt="x", seed=MAX_SEED).seed == MAX_SEED
    assert message(seed=MAX_SEED, num_images=2).seeds == (MAX_SEED, 0)


@pytest.mark.parametrize(
    ("config", "accept", "refusal"),
    [
        ({"maxmemory-policy": "allkeys-lru", "appendonly": "yes", "save": ""}, True, "noeviction"),
        ({"maxmemory-policy": "allkeys-random", "appendonly": "yes", "save": ""}, True, "noeviction"),
        ({"maxmemory-policy": "noeviction", "appendonly": "no", "save": ""}, False, "ACCEPT_VOLATILE"),
        ({"maxmemory-policy": "noeviction", "appendonly": "no", "save": ""}, True, None),
        ({"maxmemory-policy": "noeviction", "appendonly": "yes", "save": ""}, False, None),
        ({"maxmemory-policy": "volatile-lru", "appendonly": "no", "save": "3600 1"}, False, None),
    ],
)
def test_redis_settings_that_lose_jobs_stop_the_start(
    config: dict[str, str], accept: bool, refusal: str | None
) -> None:
    if refusal:
        with pytest.raises(StartupError, match=refusal):
            check_redis(config, accept)
    else:
        assert check_redis(config, accept)
    assert "not checked" in check_redis(None, False)[0]


def test_an_unwritable_file_stops_the_start(tmp_path: Any) -> None:
    check_writable(str(tmp_path / "ready"), "SDQ_READY_FILE")
    assert not (tmp_path / "ready").exists(), "the check leaves no file behind"
    with pytest.raises(StartupError, match="SDQ_HEARTBEAT_FILE"):
        check_writable(str(tmp_path / "missing-dir" / "beat"), "SDQ_HEARTBEAT_FILE")


def many_scan_jpeg(scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated: valid markers, ``scans`` scans in all."""
    pixels = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last = data.rindex(b"\xff\xda")
    body, tail = data[last:-2], data[-2:]
    return data[:last] + body * (scans - jpeg_scans(data) + 1) + tail


def test_jpegs_with_too_many_scans_are_refused_before_decoding() -> None:
    assert jpeg_scans(many_scan_jpeg(500)) == 500
    with pytest.raises(InputImageError, match="500 scans"):
        decode_input_image(many_scan_jpeg(500), 4096 * 4096, max_scans=64)
    assert decode_input_image(many_scan_jpeg(20), 4096 * 4096, max_scans=64).size == (64, 64)

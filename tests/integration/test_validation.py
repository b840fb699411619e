"""Every contract limit gives a clear error at submit, and again in the worker when a raw
Celery client bypasses the producer. The worker keeps serving afterwards."""

from __future__ import annotations

from typing import Any

import pytest
from celery.result import AsyncResult

from sdqueue import JobValidationError, SdQueue, Txt2ImgJob
from sdqueue.contract import job_json_schema, parse_job
from sdqueue.names import IMG2IMG_TASK, TXT2IMG_TASK
from tests.helpers import ROOT

GOOD = {"prompt": "a boat", "width": 64, "height": 64, "steps": 2}

# (case id, payload changes, text the error must contain)
BAD_SPECS: list[tuple[str, dict[str, Any], str]] = [
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("prompt too long", {"prompt": "x" * 2001}, "prompt"),
    ("negative prompt too long", {"negative_prompt": "x" * 2001}, "negative_prompt"),
    ("steps zero", {"steps": 0}, "steps"),
    ("steps too many", {"steps": 151}, "steps"),
    ("guidance negative", {"guidance_scale": -1.0}, "guidance_scale"),
    ("guidance too high", {"guidance_scale": 31.0}, "guidance_scale"),
    ("width not multiple of 8", {"width": 100}, "width"),
    ("width too small", {"width": 32}, "width"),
    ("height too large", {"height": 4096}, "height"),
    ("too many pixels", {"width": 2048, "height": 2048}, "pixels"),
    ("zero images", {"num_images": 0}, "num_images"),
    ("too many images", {"num_images": 9}, "num_images"),
    ("negative seed", {"seed": -1}, "seed"),
    ("seed too large", {"seed": 2**64}, "seed"),
    ("unknown scheduler", {"scheduler": "warp"}, "scheduler"),
    ("width as string", {"width": "512"}, "width"),
    ("steps as float", {"steps": 2.5}, "steps"),
    ("steps as bool", {"steps": True}, "steps"),
    ("prompt as list", {"prompt": ["a"]}, "prompt"),
    ("unknown field", {"cfg": 7}, "unknown field"),
    ("bad job id", {"job_id": "../etc"}, "job_id"),
    ("bad output bucket name", {"output": {"bucket": "Bad_Bucket"}}, "output.bucket"),
    ("output prefix escape", {"output": {"bucket": "sdqueue", "prefix": "a/../b"}}, "prefix"),
]
BAD_IMG2IMG: list[tuple[str, dict[str, Any], str]] = [
    ("strength zero", {"strength": 0.0}, "strength"),
    ("strength above one", {"strength": 1.5}, "strength"),
    ("no denoising step", {"steps": 2, "strength": 0.3}, "steps x strength"),
    ("missing image_url", {"image_url": None}, "image_url"),
]


def img2img(**changes: Any) -> dict[str, Any]:
    job = {**GOOD, "mode": "img2img", "image_url": "s3://inputs/x.png", "steps": 10, **changes}
    return {k: v for k, v in job.items() if v is not None}


CASES = [(name, {**GOOD, "mode": "txt2img", **changes}, hint) for name, changes, hint in BAD_SPECS] + [
    (name, img2img(**changes), hint) for name, changes, hint in BAD_IMG2IMG
]


@pytest.mark.parametrize(("name", "payload", "hint"), CASES, ids=[case[0] for case in CASES])
def test_submit_refuses_with_a_clear_message(queue: SdQueue, name: str, payload: dict, hint: str) -> None:
    with pytest.raises(JobValidationError) as info:
        queue.submit(payload)
    assert hint in str(info.value), str(info.value)


def test_submit_refuses_non_objects_and_unknown_modes(queue: SdQueue) -> None:
    with pytest.raises(JobValidationError, match="JSON object"):
        parse_job(["prompt"])
    with pytest.raises(JobValidationError, match="mode"):
        queue.submit({"mode": "outpaint", "prompt": "x"})
    with pytest.raises(JobValidationError, match="output.bucket"):
        queue.submit({**GOOD, "mode": "txt2img", "output": {"bucket": "other"}})


@pytest.mark.usefixtures("worker")
def test_worker_refuses_the_same_payloads_from_a_raw_celery_client(queue: SdQueue) -> None:
    """A raw client sends straight to the queue; each bad job fails alone, with the same message."""
    sent = []
    for name, payload, hint in CASES + [
        ("bucket not allowed", {**GOOD, "output": {"bucket": "other"}}, "output.bucket"),
        # the task id names the output folder: a differing job_id would make the manifest lie
        ("job_id differs from the task id", {**GOOD, "job_id": "someone-else"}, "differs from the task id"),
    ]:
        body = {k: v for k, v in payload.items() if k != "mode"}
        task = IMG2IMG_TASK if payload.get("mode") == "img2img" else TXT2IMG_TASK
        sent.append((name, hint, queue.celery.send_task(task, kwargs=body, queue="sdqueue.interactive")))
    good = queue.submit(Txt2ImgJob(**GOOD))
    for name, hint, result in sent:
        result.get(timeout=120, propagate=False)
        assert result.state == "FAILURE", name
        assert type(result.result).__name__ == "JobValidationError", (name, result.result)
        assert hint in str(result.result), (name, str(result.result))
    assert good.wait(timeout=120).images, "the worker must keep serving after bad jobs"


@pytest.mark.usefixtures("worker")
def test_worker_refuses_a_malformed_payload(queue: SdQueue) -> None:
    result: AsyncResult = queue.celery.send_task(
        TXT2IMG_TASK, args=["not", "kwargs"], queue="sdqueue.interactive"
    )
    result.get(timeout=60, propagate=False)
    assert result.state == "FAILURE"
    assert queue.submit(Txt2ImgJob(**GOOD)).wait(timeout=120).images


def test_json_schema_is_exported_and_current() -> None:
    import json

    schema = job_json_schema()
    assert {"Txt2ImgJob", "Img2ImgJob"} <= set(schema["$defs"])
    committed = json.loads((ROOT / "docs" / "job-schema.json").read_text())
    assert committed == json.loads(json.dumps(schema)), "run `make schema` and commit docs/job-schema.json"

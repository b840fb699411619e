"""The job contract's own logic: messages, cross-field checks, fingerprint, derived seed."""

from __future__ import annotations

import hashlib
import json

import pytest

from sdqueue.contract import (
    OutputLocation,
    derived_seed,
    is_valid_job_id,
    job_json_schema,
    parse_job,
    spec_fingerprint,
)
from sdqueue.errors import JobValidationError

GOOD = {"mode": "txt2img", "prompt": "p", "width": 64, "height": 64, "steps": 2}


def refusal(payload: object) -> str:
    with pytest.raises(JobValidationError) as info:
        parse_job(payload)
    return str(info.value)


def test_non_objects_and_unknown_modes() -> None:
    assert refusal(["x"]) == "a job must be a JSON object, got list"
    assert refusal({"prompt": "p"}) == "mode: must be 'txt2img', 'img2img' or 'inpaint'"
    assert refusal({**GOOD, "mode": "outpaint"}) == "mode: must be 'txt2img', 'img2img' or 'inpaint'"


def test_messages_name_the_field_without_the_mode_and_join_problems() -> None:
    assert refusal({**GOOD, "steps": 0, "cfg": 1}) == (
        "invalid job: steps: Input should be greater than or equal to 1; "
        "cfg: unknown field; remove it (see the job schema for accepted fields)"
    )
    img2img = refusal({**GOOD, "mode": "img2img", "image_url": "s3://inputs/a.png", "steps": 0})
    assert img2img == "invalid job: steps: Input should be greater than or equal to 1"
    assert "output.bucket: String should match pattern" in refusal(
        {**GOOD, "output": {"bucket": "Bad_Bucket"}}
    )
    nested = refusal({**GOOD, "output": {"bucket": "sdqueue", "prefix": "a/../b"}})
    assert (
        "output: prefix must not contain empty, '.' or '..' segments" in nested
        and "Value error" not in nested
    )


def test_pixel_limit_is_the_product() -> None:
    assert parse_job({**GOOD, "width": 2048, "height": 1024}).width == 2048
    assert refusal({**GOOD, "width": 2048, "height": 1032}) == (
        "invalid job: width x height = 2113536 pixels is over the limit of 2097152; lower width or height"
    )


def test_img2img_needs_one_effective_step() -> None:
    base = {**GOOD, "mode": "img2img", "image_url": "s3://inputs/a.png"}
    assert parse_job({**base, "steps": 2, "strength": 0.5}).strength == 0.5
    message = refusal({**base, "steps": 3, "strength": 0.3})
    assert "steps x strength = 3 x 0.3 runs no denoising step" in message


def test_callback_rules() -> None:
    assert parse_job({**GOOD, "callback_task": "app.done", "callback_queue": "q"}).callback_queue == "q"
    assert "set callback_task too" in refusal({**GOOD, "callback_queue": "q"})
    assert "callback_task: names starting with 'sdqueue.' belong to sdqueue" in refusal(
        {**GOOD, "callback_task": "sdqueue.txt2img"}
    )
    assert "callback_queue: names starting with 'sdqueue.'" in refusal(
        {**GOOD, "callback_task": "app.done", "callback_queue": "sdqueue.interactive"}
    )


def test_output_prefix_is_stripped_of_slashes() -> None:
    assert OutputLocation(bucket="sdqueue", prefix="/a/b/").prefix == "a/b"
    assert OutputLocation(bucket="sdqueue", prefix="a..b").prefix == "a..b"


def test_fingerprint_ignores_the_job_id_only() -> None:
    one = parse_job({**GOOD, "job_id": "a"})
    assert spec_fingerprint(one) == spec_fingerprint(parse_job({**GOOD, "job_id": "b"}))
    assert spec_fingerprint(one) != spec_fingerprint(parse_job({**GOOD, "prompt": "q"}))
    assert len(spec_fingerprint(one)) == 32
    stable = json.dumps(one.model_dump(mode="json", exclude={"job_id"}), sort_keys=True)
    assert spec_fingerprint(one) == hashlib.sha256(stable.encode()).hexdigest()[:32]


def test_derived_seed_is_the_documented_derivation() -> None:
    for job_id in ("a", "job-1", "x" * 128):
        digest = hashlib.sha256(job_id.encode()).digest()
        assert derived_seed(job_id) == int.from_bytes(digest[:8], "big") & (2**53 - 1)
    assert {derived_seed(str(i)) >> 52 for i in range(64)} == {0, 1}, "uses the top seed bits too"


def test_job_ids_and_schema() -> None:
    assert is_valid_job_id("a.b:c-d_1") and not is_valid_job_id("../x") and not is_valid_job_id("")
    assert not is_valid_job_id("a" * 129) and is_valid_job_id("a" * 128)
    schema = job_json_schema()
    assert set(schema["discriminator"]["mapping"]) == {"txt2img", "img2img", "inpaint"}
    assert "image_url" in schema["$defs"]["Img2ImgJob"]["required"]

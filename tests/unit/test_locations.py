"""Input URLs: the accepted forms parse to the right object, everything else is refused."""

from __future__ import annotations

import pytest

from sdqueue.errors import InputImageError
from sdqueue.locations import ObjectRef, allowed_input, check_allowed, parse_object_url

ENDPOINT = "http://minio.local:9000"


@pytest.mark.parametrize(
    ("url", "endpoint", "expected"),
    [
        ("s3://inputs/a/b.png", None, ObjectRef("inputs", "a/b.png")),
        ("S3://inputs//a.png", None, ObjectRef("inputs", "a.png")),
        ("  s3://inputs/a.png  ", None, ObjectRef("inputs", "a.png")),
        ("s3://inputs/with%20space.png", None, ObjectRef("inputs", "with space.png")),
        ("s3://inputs/Xa.png", None, ObjectRef("inputs", "Xa.png")),
        ("http://minio.local:9000/inputs/a.png", ENDPOINT, ObjectRef("inputs", "a.png")),
        ("http://MINIO.local:9000/inputs/a.png", ENDPOINT, ObjectRef("inputs", "a.png")),
        ("http://minio.local/inputs/a.png", "http://minio.local:80", ObjectRef("inputs", "a.png")),
        ("http://minio.local:80/inputs/a.png", "http://minio.local", ObjectRef("inputs", "a.png")),
        ("https://minio.local/inputs/k", "https://minio.local:443", ObjectRef("inputs", "k")),
        ("https://minio.local:443/inputs/k", "https://minio.local", ObjectRef("inputs", "k")),
    ],
)
def test_accepted_forms(url: str, endpoint: str | None, expected: ObjectRef) -> None:
    assert parse_object_url(url, endpoint) == expected


@pytest.mark.parametrize(
    ("url", "endpoint", "hint"),
    [
        ("http://other.host:9000/inputs/a.png", ENDPOINT, "accepted only on the storage endpoint"),
        ("http://minio.local:9001/inputs/a.png", ENDPOINT, "accepted only on the storage endpoint"),
        ("https://minio.local:9000/inputs/a.png", ENDPOINT, "accepted only on the storage endpoint"),
        ("http://minio.local/inputs/a.png", "https://minio.local", "accepted only on the storage endpoint"),
        ("http://u:p@minio.local:9000/inputs/a.png", ENDPOINT, "accepted only on the storage endpoint"),
        ("http://u@minio.local:9000/inputs/a.png", ENDPOINT, "accepted only on the storage endpoint"),
        ("http://minio.local:9000/inputs/a.png", None, "storage endpoint (none configured); use s3://"),
        ("file:///etc/passwd", ENDPOINT, "scheme 'file' is not accepted"),
        ("inputs/a.png", ENDPOINT, "scheme '(none)' is not accepted"),
        ("s3://inputs", None, "expected a bucket and an object key"),
        ("s3://inputs/", None, "expected a bucket and an object key"),
        ("s3://inputs/dir/", None, "expected a bucket and an object key"),
        ("s3://In_Puts/a.png", None, "expected a bucket and an object key"),
        ("s3://ab/a.png", None, "expected a bucket and an object key"),
        ("s3://Xinputs/a.png", None, "expected a bucket and an object key"),
        ("http://minio.local:9000/Xinputs/a.png", ENDPOINT, "expected a bucket and an object key"),
        ("http://minio.local:9000/inputs/", ENDPOINT, "expected a bucket and an object key"),
        ("s3://inputs/a/../b.png", None, "empty, '.' or '..' segments"),
        ("s3://inputs/a/./b.png", None, "empty, '.' or '..' segments"),
        ("s3://inputs/a//b.png", None, "empty, '.' or '..' segments"),
        ("s3://inputs/a%2F..%2Fb.png", None, "empty, '.' or '..' segments"),
        ("s3://inputs/a%00.png", None, "empty, '.' or '..' segments"),
    ],
)
def test_refused_forms(url: str, endpoint: str | None, hint: str) -> None:
    with pytest.raises(InputImageError) as info:
        parse_object_url(url, endpoint)
    assert hint in str(info.value)
    assert str(info.value).startswith(f"image_url {url!r}: ")


def test_the_refusal_names_the_configured_endpoint() -> None:
    with pytest.raises(
        InputImageError, match="storage endpoint http://minio.local:9000; use s3://bucket/key"
    ):
        parse_object_url("http://evil/inputs/a.png", ENDPOINT)


def test_bucket_allow_list() -> None:
    ref = ObjectRef("inputs", "a.png")
    assert check_allowed(ref, ["inputs"], "u") is ref
    with pytest.raises(InputImageError) as info:
        check_allowed(ref, ["other", "more"], "s3://inputs/a.png")
    message = str(info.value)
    assert "bucket 'inputs' is not allowed for inputs; allowed: other, more" in message
    assert message.startswith("image_url 's3://inputs/a.png'")
    with pytest.raises(InputImageError, match=r"allowed: \(none\)"):
        check_allowed(ref, [], "u")
    assert allowed_input("s3://inputs/a.png", None, ["inputs"]) == ref
    with pytest.raises(InputImageError, match="^image_url 's3://other/a.png': bucket 'other' is not allowed"):
        allowed_input("s3://other/a.png", None, ["inputs"])


def test_object_ref_url() -> None:
    assert ObjectRef("b", "k/x.png").url == "s3://b/k/x.png"

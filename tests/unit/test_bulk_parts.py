"""Bulk parts without services: the template message equals Celery's own, content ids, the seen table,
the streaming reader and the report format."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from sdqueue.bulk import BulkJob, Duplicates, LineNote, Preparer, settle
from sdqueue.bulk_ids import Seen, SeenIds, SeenOnDisk, SeenTable, content_job_id
from sdqueue.bulk_input import Row, count_lines, parse_object, read_rows
from sdqueue.bulk_report import ReportWriter, read_report
from sdqueue.bulk_wire import MessageTemplate, lane_lists
from sdqueue.celeryconfig import make_celery
from sdqueue.client import SdQueue, job_record, publish_job
from sdqueue.contract import Img2ImgJob, Txt2ImgJob, parse_job, spec_fingerprint
from sdqueue.settings import Settings

PER_MESSAGE = {("headers", "origin"), ("headers", "sdq_submitted_at"), ("properties", "delivery_tag")}


def celery_message(spec: Txt2ImgJob | Img2ImgJob, queue_name: str) -> dict[str, object]:
    """The envelope Celery + kombu build for the job (kombu's in-memory transport keeps it as is)."""
    app = make_celery(Settings())
    app.conf.broker_url = "memory://"
    with app.producer_or_acquire() as producer:
        publish_job(app, producer, str(spec.job_id), spec, queue_name, False, retry=False)
        message: dict[str, object] = producer.channel._get(queue_name)
    return message


def test_template_message_is_celerys_message_field_by_field() -> None:
    for spec in (
        Txt2ImgJob(prompt='a fox, "quoted" ü', seed=3, job_id="wire-1"),
        Img2ImgJob(prompt="snow", image_url="s3://sdqueue/in.png", strength=0.4, job_id="wire-2"),
    ):
        theirs = celery_message(spec, "sdqueue.bulk")
        kwargs = json.dumps(spec.model_dump(mode="json", exclude_none=True))
        ours = json.loads(MessageTemplate("sdqueue.bulk").build(str(spec.job_id), spec.mode, kwargs))
        assert set(ours) == set(theirs)
        assert base64.b64decode(ours["body"]) == base64.b64decode(str(theirs["body"]))
        for part in ("headers", "properties"):
            mine, celery = ours[part], theirs[part]
            assert isinstance(celery, dict) and set(mine) == set(celery), part
            for key in mine:
                if (part, key) not in PER_MESSAGE:
                    assert mine[key] == celery[key], (part, key)
        assert {key: ours[key] for key in ("content-type", "content-encoding")} == {
            key: theirs[key] for key in ("content-type", "content-encoding")
        }
    assert lane_lists("q") == ["q", "q\x06\x163", "q\x06\x166", "q\x06\x169"]
    template = MessageTemplate("q")
    tags = {
        json.loads(template.build(f"t{i}", "txt2img", "{}"))["properties"]["delivery_tag"] for i in range(3)
    }
    assert len(tags) == 3
    job = Preparer(SdQueue(Settings())).one(Row(1, {"mode": "txt2img", "prompt": "claim"}))
    assert isinstance(job, BulkJob) and json.loads(job.claim())["fingerprint"] == spec_fingerprint(job.spec)


def test_content_id_ignores_line_numbers_and_defaults_but_not_the_spec_or_run() -> None:
    explicit = Txt2ImgJob(prompt="a", steps=30)
    implicit = Txt2ImgJob(prompt="a")
    assert content_job_id(spec_fingerprint(explicit)) == content_job_id(spec_fingerprint(implicit))
    other = content_job_id(spec_fingerprint(Txt2ImgJob(prompt="a", steps=31)))
    assert other != content_job_id(spec_fingerprint(implicit))
    fingerprint = spec_fingerprint(implicit)
    ids = {content_job_id(fingerprint), content_job_id(fingerprint, "v2"), content_job_id(fingerprint, "", 2)}
    assert len(ids) == 3


def test_seen_ids_grow_then_move_to_disk_and_remember_first_line_count_and_tag() -> None:
    table = SeenIds(memory_ids=3000)
    for i in range(5000):
        assert table.add(f"id-{i}", i + 1, f"{i:08x}" + "0" * 24) is None
    assert isinstance(table.store, SeenOnDisk), "past memory_ids the table moved to SQLite"
    seen = table.add("id-1234", 9999, f"{1234:08x}" + "0" * 24)
    assert seen is not None and (seen.first_line, seen.count, seen.tag) == (1235, 1, 1234)
    again = table.add("id-1234", 10000, "f" * 32)
    assert again is not None and again.count == 2
    small = SeenTable(capacity=4)
    assert [small.add(f"k{i}", i, "0" * 32) for i in range(100)] == [None] * 100
    assert len(small) == 100 and small.add("k7", 1, "0" * 32) == Seen(7, 1, 0)
    table.close()


def test_rows_stream_with_line_numbers_and_report_round_trips(tmp_path: Path) -> None:
    lines = ['{"prompt": "a"}\n', "\n", "# note\n", "{nope\n", '{"prompt": "b"}']
    rows = read_rows(iter(lines), "jsonl", "txt2img")
    assert next(rows).line == 1
    bad = next(rows)
    assert bad.line == 4 and bad.spec is None and "not valid JSON" in (bad.error or "")
    assert next(rows).spec == {"mode": "txt2img", "prompt": "b"}
    (tmp_path / "f.jsonl").write_text("".join(lines))
    assert count_lines(str(tmp_path / "f.jsonl")) == 5
    record = {
        "line": 3,
        "job_id": "j",
        "state": "succeeded",
        "images": ["s3://b/k1", "s3://b/k2"],
        "seeds": [1, 2],
    }
    for name in ("r.jsonl", "r.csv"):
        writer = ReportWriter(str(tmp_path / name))
        writer.write(record)
        writer.close()
        back = next(read_report(str(tmp_path / name)))
        assert back["images"] == record["images"] and back["job_id"] == "j", name
    with open(tmp_path / "r.jsonl", "a") as torn:
        torn.write('{"line": 4, "job_')
    assert len(list(read_report(str(tmp_path / "r.jsonl")))) == 1


def _ids(
    lines: list[str], duplicates: Duplicates = "once", run_name: str = ""
) -> list[tuple[int, str, str | None]]:
    """(line, state, job id) of each line of a CSV file, as ``sdqueue bulk`` would give them."""
    preparer = Preparer(SdQueue(Settings()), run_name, duplicates)
    return [
        (item.line, item.state, item.job_id) for item in preparer(read_rows(iter(lines), "csv", "txt2img"))
    ]


def test_an_edited_file_changes_only_the_ids_of_new_and_edited_lines() -> None:
    header = "prompt,steps,seed,job_id\n"
    first = _ids([header, "a,20,1,\n", "b,20,2,\n", "c,20,3,\n", "d,20,4,\n", "e,20,,own-e\n"])
    assert [state for _, state, _ in first] == ["pending"] * 5
    edited = _ids([header, "new,20,9,\n", "a,20,1,\n", "c,21,3,\n", "e,20,,own-e\n", "b,20,2,\n"])
    before = {job_id for _, _, job_id in first}
    assert [job_id in before for _, _, job_id in edited] == [False, True, False, True, True]
    assert edited[3][2] == "own-e" and all(
        job_id.startswith("bulk-") for _, _, job_id in edited if job_id != "own-e"
    )
    renamed = _ids([header, "a,20,1,\n"], run_name="v2")
    assert renamed[0][2] not in before, "a run name gives every content id a new value"


def test_repeated_lines_run_once_or_each_and_a_reused_job_id_is_invalid() -> None:
    lines = ["prompt,job_id\n", "a,\n", "b,\n", "a,\n", "x,mine\n", "x,mine\n", "y,mine\n"]
    once = _ids(lines)
    assert [(line, state) for line, state, _ in once] == [
        (2, "pending"),
        (3, "pending"),
        (4, "duplicate"),
        (5, "pending"),
        (6, "duplicate"),
        (7, "invalid"),
    ]
    assert once[2][2] == once[0][2]
    each = _ids(lines, duplicates="each")
    assert each[2][1] == "pending" and each[2][2] not in (each[0][2], None)
    assert _ids(lines, duplicates="each")[2][2] == each[2][2], "the copy's id is stable too"
    assert each[4][1] == "duplicate", "a repeated explicit job_id always runs once"


def test_one_pass_texts_and_json_validation_equal_the_reference_path() -> None:
    """The fast path (pydantic's JSON parser, both texts from one pass, the template message) gives
    the ids, kwargs and errors of the reference path (json.loads, parse_job, two json.dumps)."""
    specs = [
        {"mode": "txt2img", "prompt": 'a "fox" ü \\ 雪', "seed": 2**63 - 1, "guidance_scale": 7, "steps": 25},
        {"prompt": "no mode", "negative_prompt": "x", "width": 512, "height": 768, "job_id": "own-1"},
        {
            "mode": "txt2img",
            "prompt": "all",
            "scheduler": "euler",
            "output": {"bucket": "sdqueue", "prefix": "/p/q/"},
            "loras": [{"name": "b", "scale": 0.5}, {"name": "a"}],
            "output_format": "webp",
            "output_quality": 80,
            "guidance_scale": 1e-7,
        },
        {"mode": "img2img", "prompt": "in", "image_url": "s3://sdqueue/in.png", "strength": 0.25},
    ]
    settings = Settings(input_buckets=["sdqueue"], allowed_output_buckets=["sdqueue"])
    queue = SdQueue(settings)
    for number, raw in enumerate(specs, start=1):
        fast = Preparer(queue).one(Row(number, text=json.dumps(raw), default_mode="txt2img"))
        reference = queue.validate(parse_job({"mode": "txt2img", **raw}))
        assert isinstance(fast, BulkJob) and fast.spec == reference
        assert fast.fingerprint == spec_fingerprint(reference)
        assert fast.job_id == (reference.job_id or content_job_id(spec_fingerprint(reference)))
        kwargs = reference.model_dump(mode="json", exclude_none=True)
        kwargs["job_id"] = fast.job_id
        assert fast.kwargs_json() == json.dumps(kwargs)
        at = re.compile(r'"at": [0-9.e+-]+')
        assert at.sub("AT", fast.claim()) == at.sub("AT", job_record(reference, fast.fingerprint))
    bad = ['{"prompt": "a", "steps": 30.0}', '{"prompt": "a", "bogus": 1}', "[1]", "{nope", '{"prompt": ""}']
    for number, text in enumerate(bad, start=1):
        note = Preparer(queue).one(Row(number, text=text, default_mode="txt2img"))
        reference_row = Row(number, *parse_object(text))
        expected = Preparer(queue).one(
            Row(number, {"mode": "txt2img", **reference_row.spec}) if reference_row.spec else reference_row
        )
        assert isinstance(note, LineNote) and note.state == "invalid" and note.error == expected.error
        assert note.error and note.error.startswith(f"line {number}: ")


def test_a_csv_loras_cell_names_adapters_with_optional_scales() -> None:
    lines = ["prompt,loras\n", "a boat,detail:0.8; style\n", "a cat,\n", "a dog,detail:x\n", "a cow,;style\n"]
    rows = list(read_rows(iter(lines), "csv", "txt2img"))
    first = parse_job(rows[0].spec or {})
    assert [(lora.name, lora.scale) for lora in first.loras] == [("detail", 0.8), ("style", 1.0)]
    assert rows[1].spec == {"mode": "txt2img", "prompt": "a cat"}
    assert rows[2].spec is None and "scale 'x' of 'detail' is not a number" in (rows[2].error or "")
    assert rows[3].spec is None and "empty adapter name" in (rows[3].error or "")


def test_a_cancelled_jobs_report_error_is_the_workers_reason() -> None:
    def error_of(meta: dict[str, object] | None, cancelled: bool = False) -> str | None:
        job = BulkJob(line=1, job_id="j", spec=parse_job({"mode": "txt2img", "prompt": "p"}), fingerprint="f")
        assert settle(job, meta, cancelled)
        return job.error

    revoked = {"exc_type": "TaskRevokedError", "exc_message": ["cancelled before it started"]}
    assert error_of({"status": "REVOKED", "result": revoked}) == "cancelled before it started"
    terminated = {"exc_type": "TaskRevokedError", "exc_message": ["terminated"]}
    assert error_of({"status": "REVOKED", "result": terminated}) == "cancelled (terminated)"
    assert error_of({"status": "STARTED", "result": None}, cancelled=True) == "cancelled"
    failed = {"exc_type": "JobFailed", "exc_message": ["pipeline error: x"]}
    assert error_of({"status": "FAILURE", "result": failed}) == "JobFailed: pipeline error: x"

"""docs/settings.md stays generated from the settings classes; unknown SDQ_* variables are warned
about with the nearest known name."""

from __future__ import annotations

import logging

import pytest

from sdqueue import settings as client_settings
from sdqueue.settings import OTHER_NAMES, SERVER_ONLY_NAMES, WORKER_ONLY_NAMES, Settings, unknown_env
from sdqueue_worker.settings import WorkerSettings
from sdqueue_worker.settings_doc import render
from tests.helpers import ROOT


def test_the_settings_reference_is_up_to_date() -> None:
    text = (ROOT / "docs" / "settings.md").read_text()
    assert text == render(), "docs/settings.md is stale: run `make settings-doc`"
    for name in WorkerSettings.model_fields:
        assert f"`SDQ_{name.upper()}`" in text


def test_the_client_knows_every_worker_setting_name() -> None:
    assert set(WORKER_ONLY_NAMES) == set(WorkerSettings.model_fields) - set(Settings.model_fields)
    from sdqueue.server.settings import ServerSettings

    assert set(SERVER_ONLY_NAMES) == set(ServerSettings.model_fields) - set(Settings.model_fields)


def test_unknown_names_get_the_nearest_known_one() -> None:
    known = set(WorkerSettings.model_fields)
    environ = {
        "SDQ_MAX_BACTH": "2",
        "SDQ_REDIS_URL": "redis://x",
        "SDQ_WEBHOK_SECRET": "x",
        "SDQ_ZZZ": "1",
        "PATH": "/bin",
        **{name: "1" for name in OTHER_NAMES},
    }
    assert unknown_env(known, environ) == [
        ("SDQ_MAX_BACTH", "SDQ_MAX_BATCH"),
        ("SDQ_WEBHOK_SECRET", "SDQ_WEBHOOK_SECRET"),
        ("SDQ_ZZZ", None),
    ]


def test_a_client_warns_once_at_settings_creation(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(client_settings, "_warned", set())
    monkeypatch.setenv("SDQ_OUTPUT_BUKET", "x")
    monkeypatch.setenv("SDQ_MAX_BATCH", "4")  # a worker setting: not unknown to a web backend
    with caplog.at_level(logging.WARNING, logger="sdqueue.settings"):
        Settings()
        Settings()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "unknown setting SDQ_OUTPUT_BUKET is ignored; did you mean SDQ_OUTPUT_BUCKET? (all settings: docs/settings.md)"
    ]

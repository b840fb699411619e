"""The worker refuses to start on diffusers or transformers older than its floors, and says why."""

from __future__ import annotations

import pytest

from sdqueue.errors import StartupError
from sdqueue_worker.runtime import MIN_VERSIONS, check_versions, library_versions


def test_installed_versions_pass() -> None:
    check_versions(library_versions())


@pytest.mark.parametrize(
    ("name", "version"), [("diffusers", "0.39.9"), ("diffusers", "0.30.0"), ("transformers", "5.5.4")]
)
def test_old_version_is_a_clear_startup_error(name: str, version: str) -> None:
    wanted = ".".join(map(str, MIN_VERSIONS[name]))
    with pytest.raises(
        StartupError, match=rf'{name} {version} is older than {wanted}.*pip install "{name}>={wanted}"'
    ):
        check_versions({"diffusers": "0.40.0", "transformers": "5.6.0", name: version})


@pytest.mark.parametrize("version", ["0.40.0", "0.40.0.dev0", "0.41.1", "1.0"])
def test_floor_and_newer_pass(version: str) -> None:
    check_versions({"diffusers": version, "transformers": "5.6.0rc1"})

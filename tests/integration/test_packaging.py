"""The wheel holds exactly the two import packages, typed; the dependency floors really work."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY_MODEL

FLOORS = {
    "diffusers": "0.40.0",
    "transformers": "5.6.0",
    # what those two need at their own floors (diffusers 0.40: huggingface-hub>=1.23,<2;
    # transformers 5.6: tokenizers>=0.22,<=0.23.0), the rest comes from the environment
    "huggingface_hub": "1.33.0",
    "tokenizers": "0.22.2",
}
FLOOR_CACHE = ROOT / ".cache" / "floor-deps"


def test_wheel_has_exactly_the_two_typed_import_packages(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=240,
    )
    (wheel,) = tmp_path.glob("sdqueue-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    print(f"{wheel.name}: {len(names)} files, top-level {sorted(top_level)}")
    assert top_level == {"sdqueue", "sdqueue_worker"}
    assert {"sdqueue/py.typed", "sdqueue_worker/py.typed"} <= set(names)
    metadata = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py')[0]}.dist-info/METADATA").decode()
    for name, version in (("diffusers", "0.40"), ("transformers", "5.6")):
        assert f"{name}>={version}" in metadata


def _install_floors() -> Path:
    target = FLOOR_CACHE / "-".join(f"{name}{version}" for name, version in FLOORS.items())
    if not (target / "diffusers").is_dir():
        specs = [f"{name}=={version}" for name, version in FLOORS.items()]
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *specs],
            check=True,
            timeout=480,
        )
    return target


@pytest.mark.slow
def test_tiny_model_loads_at_the_floor_versions(tiny_model: str) -> None:
    target = _install_floors()
    script = (
        "import diffusers, transformers, torch\n"
        "from safetensors.torch import load_file\n"
        "from sdqueue_worker.runtime import load_runtime\n"
        "from sdqueue_worker.settings import WorkerSettings\n"
        f"assert diffusers.__file__.startswith({str(target)!r}), diffusers.__file__\n"
        "runtime = load_runtime(WorkerSettings())\n"
        "print(runtime.versions)\n"
        # a silently mis-loaded text encoder (random weights) must fail this test
        "norm = lambda key: key.removeprefix('text_model.')\n"
        f"saved = load_file({str(Path(tiny_model) / 'text_encoder' / 'model.safetensors')!r})\n"
        "loaded = {norm(k): v for k, v in runtime.txt2img.text_encoder.state_dict().items()}\n"
        "bad = [k for k, v in saved.items() if not torch.equal(loaded.get(norm(k), torch.empty(0)), v)]\n"
        "assert not bad, f'text encoder weights not loaded: {bad[:3]}'\n"
        "image = runtime.txt2img('a', num_inference_steps=2, width=64, height=64, output_type='np').images\n"
        "assert image.shape == (1, 64, 64, 3), image.shape\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(target), str(ROOT / "producer"), str(ROOT / "worker")]),
        "SDQ_MODEL": str(TINY_MODEL),
        "SDQ_DEVICE": "cpu",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'diffusers': '0.40.0'" in done.stdout and "'transformers': '5.6.0'" in done.stdout

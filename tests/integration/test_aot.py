"""AOT packages (sdqueue_worker.aot) built and loaded for real on the CPU with the tiny model: a
second router finds the package on disk and builds nothing, the loaded code runs on the module's
own weights, signatures it has no package for and broken packages run the fallback forward.

One AOTInductor build of the tiny UNet (about 30 s on two cores) serves the whole module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from sdqueue_worker.aot import AotForward
from sdqueue_worker.runtime import Runtime, load_runtime
from sdqueue_worker.settings import WorkerSettings


class Counting:
    """The eager forward, counting the calls that reach it."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.forward(*args, **kwargs)


@pytest.fixture(scope="module")
def runtime(tiny_model: str) -> Runtime:
    return load_runtime(WorkerSettings(model=tiny_model, device="cpu"))


def unet_inputs(runtime: Runtime, batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    config = runtime.txt2img.unet.config
    generator = torch.Generator().manual_seed(batch)
    sample = torch.randn(
        batch, config.in_channels, config.sample_size, config.sample_size, generator=generator
    )
    embeds = torch.randn(batch, 77, config.cross_attention_dim, generator=generator)
    return (sample, torch.tensor(500.0)), {"encoder_hidden_states": embeds, "return_dict": False}


@pytest.fixture(scope="module")
def built(runtime: Runtime, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A package built from one real txt2img call through the router; its first output."""
    directory = tmp_path_factory.mktemp("aot")
    unet = runtime.txt2img.unet
    router = router_on(unet, directory)
    args, kwargs = unet_inputs(runtime, 2)
    with torch.inference_mode():
        out = router(*args, **kwargs)[0]
    assert (router.built, router.loaded) == (1, 1)
    assert router.fallback.calls == 0
    assert len(list(directory.glob("unet-*.pt2"))) == 1
    return directory, out


def router_on(unet: torch.nn.Module, directory: Path) -> AotForward:
    """A router as a fresh worker makes it, with a counting eager fallback."""
    return AotForward(unet, Counting(unet.forward), directory, "unet")


def eager(runtime: Runtime, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    with torch.inference_mode():
        return runtime.txt2img.unet(*args, **kwargs)[0]


def test_the_package_computes_what_the_module_computes(
    runtime: Runtime, built: tuple[Path, torch.Tensor]
) -> None:
    _, out = built
    reference = eager(runtime, *unet_inputs(runtime, 2))
    assert out.shape == reference.shape
    assert torch.allclose(out, reference, atol=1e-4, rtol=1e-4)


def test_a_new_router_loads_the_package_and_builds_nothing(
    runtime: Runtime, built: tuple[Path, torch.Tensor]
) -> None:
    directory, first = built
    unet = runtime.txt2img.unet
    router = router_on(unet, directory)
    args, kwargs = unet_inputs(runtime, 2)
    with torch.inference_mode():
        out = router(*args, **kwargs)[0]
    assert (router.built, router.loaded, router.fallback.calls) == (0, 1, 0)
    assert torch.equal(out, first)


def test_the_loaded_code_runs_on_the_modules_own_weights(
    runtime: Runtime, built: tuple[Path, torch.Tensor]
) -> None:
    directory, first = built
    unet = runtime.txt2img.unet
    router = router_on(unet, directory)
    args, kwargs = unet_inputs(runtime, 2)
    weight = unet.conv_out.weight
    with torch.no_grad():
        weight.mul_(2.0)
    try:
        with torch.inference_mode():
            out = router(*args, **kwargs)[0]
        assert router.built == 0  # the package on disk, now running on the changed weight
        assert not torch.allclose(out, first, atol=1e-3)  # no copy of the weights in the package
        assert torch.allclose(out, eager(runtime, args, kwargs), atol=1e-4, rtol=1e-4)
    finally:
        with torch.no_grad():
            weight.div_(2.0)


def test_other_weights_of_one_architecture_get_their_own_package(
    runtime: Runtime, built: tuple[Path, torch.Tensor]
) -> None:
    """Inductor bakes a tensor of one repeated value into the code: another model of the same
    architecture must not load that package."""
    directory, _ = built
    unet = runtime.txt2img.unet
    bias = unet.conv_out.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias.fill_(0.25)
    try:
        other = router_on(unet, directory)
        same = router_on(unet, directory)
        assert other.module_digest == same.module_digest
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    original = router_on(unet, directory)
    assert other.module_digest != original.module_digest


def test_after_warm_up_other_signatures_run_the_fallback(
    runtime: Runtime, built: tuple[Path, torch.Tensor]
) -> None:
    directory, _ = built
    unet = runtime.txt2img.unet
    fallback = Counting(unet.forward)
    router = AotForward(unet, fallback, directory, "unet")
    router.freeze()
    args, kwargs = unet_inputs(runtime, 3)
    with torch.inference_mode():
        out = router(*args, **kwargs)[0]
    assert fallback.calls == 1 and router.built == 0
    assert len(list(directory.glob("unet-*.pt2"))) == 1
    assert torch.equal(out, eager(runtime, args, kwargs))


def test_a_broken_package_falls_back_with_a_log(
    runtime: Runtime, built: tuple[Path, torch.Tensor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory, _ = built
    package = next(directory.glob("unet-*.pt2"))
    broken = tmp_path / package.name
    broken.write_bytes(b"not a zip archive")
    unet = runtime.txt2img.unet
    fallback = Counting(unet.forward)
    router = AotForward(unet, fallback, tmp_path, "unet")
    args, kwargs = unet_inputs(runtime, 2)
    with caplog.at_level(logging.ERROR, logger="sdqueue_worker.aot"), torch.inference_mode():
        out = router(*args, **kwargs)[0]
    assert fallback.calls == 1 and router.loaded == 0
    assert "runs torch.compile" in caplog.text
    assert torch.equal(out, eager(runtime, args, kwargs))

"""Ahead-of-time compiled UNet and VAE decoder (``SDQ_AOT``): one AOTInductor package per call
signature (batch bucket), kept in the compile cache, so a warm start loads compiled code in
seconds instead of tracing every bucket with dynamo again.

At warm-up, the first call of each signature is exported (``torch.export``), compiled
(``aoti_compile_and_package``) and stored as ``<directory>/<key>.pt2``; a later start finds the
file and only loads it. The key hashes everything the compiled code depends on: the module's
structure (layer types, parameter shapes and dtypes: fused QKV, FP8 and the model architecture
change it) and a fingerprint of its weights, the call's tensor shapes, dtypes and strides and its other arguments, the GPU, the
torch version, the SDPA backend order and inductor's options; a stale package is never loaded.
Weights are not stored in the package: the loaded code runs on the module's own parameters
(user-managed constants), so VRAM holds one copy and every pipeline still shares the module.

A call whose signature has no package (another image size, guidance off, after warm-up) runs the
fallback forward (``torch.compile``). A package that fails to build or load is logged and its
signature falls back too: AOT only ever adds speed, it never stops the worker.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from sdqueue.errors import StartupError
from sdqueue_worker.runtime import release

log = logging.getLogger(__name__)
FORMAT = 1
"""Bump when what a package holds or how it is called changes."""
Forward = Callable[..., Any]
_CONSTANT_TYPES = (bool, int, float, str, type(None))
MIN_TORCH = (2, 13)
"""On torch 2.11 (H200, CUDA 13) building a one-layer package took 71 s and loading it crashed the
process (benchmarks/results/raw/nvidia-h200-2026-12-01-aoti-probe-run7.log); 2.13 is the oldest
release whose packages were built, loaded and checked here (on the CPU)."""


def check_aot_supported(version: str = torch.__version__, loras: bool = False) -> None:
    """Refuse SDQ_AOT where AOTInductor packages are known to crash the worker, and with LoRAs."""
    if loras:
        raise StartupError(
            "SDQ_AOT=1 cannot be combined with SDQ_LORA_DIR: adapters are swapped into the UNet per "
            "job, which a package compiled ahead of time cannot follow; unset one of them"
        )
    if release(version)[:2] < MIN_TORCH:
        raise StartupError(
            f"SDQ_AOT=1 needs torch >= {'.'.join(map(str, MIN_TORCH))} (this is {version}: loading an "
            "AOTInductor package crashed the process on torch 2.11); unset SDQ_AOT"
        )


class Signature:
    """One call's inputs split into tensors (the package's inputs) and everything else (baked in)."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        leaves, self.spec = pytree.tree_flatten((args, kwargs))
        self.positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.tensors: list[torch.Tensor] = [leaves[i] for i in self.positions]
        self.constants: list[Any] = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        self.supported = all(isinstance(c, _CONSTANT_TYPES) for c in self.constants)

    def describe(self) -> dict[str, Any]:
        return {
            "spec": str(self.spec),
            "constants": [repr(c) for c in self.constants],
            "tensors": [(list(t.shape), str(t.dtype), list(t.stride()), t.device.type) for t in self.tensors],
        }

    def rebuild(self, tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        leaves = list(self.constants)
        for position, tensor in zip(self.positions, tensors, strict=True):
            leaves[position] = tensor
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return args, kwargs


class _Bound(torch.nn.Module):
    """``forward(*tensors)``: the module's own forward with the signature's other arguments bound."""

    def __init__(self, module: torch.nn.Module, signature: Signature) -> None:
        super().__init__()
        self.module = module
        self.signature = signature

    def forward(self, *tensors: torch.Tensor) -> Any:
        args, kwargs = self.signature.rebuild(tensors)
        return type(self.module).forward(self.module, *args, **kwargs)


def structure(module: torch.nn.Module) -> list[Any]:
    """What the compiled code depends on in the module: its layers, parameter layouts and a
    fingerprint of the weight values (inductor folds a tensor of one repeated value, e.g. an
    all-zero bias, into the code, so a package is only valid for weights that match)."""
    layers = [(name, type(child).__name__) for name, child in module.named_modules()]
    named = _named_tensors(module)
    tensors = [(name, list(t.shape), str(t.dtype), list(t.stride())) for name, t in named]
    return [layers, tensors, fingerprint([t for _, t in named])]


def fingerprint(tensors: list[torch.Tensor]) -> list[list[float]]:
    """Sum, absolute sum, min and max of each tensor (one reduction pass each, one copy to the host)."""
    with torch.no_grad():
        stats = [
            torch.stack([t.float().sum(), t.float().abs().sum(), t.float().amin(), t.float().amax()])
            for t in tensors
            if t.numel()
        ]
        return torch.stack(stats).double().cpu().tolist() if stats else []


@functools.cache
def _machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"format": FORMAT, "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu}


def environment() -> dict[str, Any]:
    """The GPU, torch and compiler options a package is built for (the options can change at
    run time: the attention fallback resets the SDPA order)."""
    import torch._inductor.config as inductor

    return {
        **_machine(),
        "sdpa_order": [int(b) for b in torch._C._get_sdp_priority_order()],
        "conv_1x1_as_mm": bool(inductor.conv_1x1_as_mm),
    }


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def structure_digest(module: torch.nn.Module) -> str:
    """The module's structure and weight fingerprint, hashed once (the UNet's is large)."""
    return _digest(structure(module))


def package_key(module_digest: str, signature: Signature) -> str:
    """The package file's key: environment, module and call signature (small; runs every call)."""
    return _digest([environment(), module_digest, signature.describe()])


def _named_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def _state(module: torch.nn.Module, prefix: str = "module.") -> dict[str, torch.Tensor]:
    return {prefix + name: t for name, t in _named_tensors(module)}


class AotForward:
    """A module's forward that runs AOT packages for the signatures warm-up saw, else ``fallback``."""

    def __init__(self, module: torch.nn.Module, fallback: Forward, directory: Path, name: str) -> None:
        self.module = module
        self.fallback = fallback
        self.directory = directory
        self.name = name
        self.building = True
        self.runners: dict[str, Forward | None] = {}
        self.loaded = 0
        self.built = 0
        self.module_digest = structure_digest(module)

    def freeze(self) -> None:
        """After warm-up: signatures without a package run the fallback (no builds mid-job)."""
        self.building = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        signature = Signature(args, kwargs)
        if not signature.supported:
            return self.fallback(*args, **kwargs)
        key = package_key(self.module_digest, signature)
        if key not in self.runners and self.building:
            self.runners[key] = self._prepare(key, signature)
        runner = self.runners.get(key)
        if runner is None:
            return self.fallback(*args, **kwargs)
        return runner(*signature.tensors)

    def _prepare(self, key: str, signature: Signature) -> Forward | None:
        path = self.directory / f"{self.name}-{key}.pt2"
        began = time.perf_counter()
        try:
            if not path.exists():
                self._build(signature, path)
                self.built += 1
            runner = self._load(path)
        except Exception:
            log.exception("AOT %s: no package for %s; that signature runs torch.compile", self.name, key)
            return None
        self.loaded += 1
        shapes = [tuple(t.shape) for t in signature.tensors]
        log.info(
            "AOT %s %s ready in %.1fs (%s)",
            self.name,
            shapes[0] if shapes else (),
            time.perf_counter() - began,
            path.name,
        )
        return runner

    def _build(self, signature: Signature, path: Path) -> None:
        with torch.inference_mode(False), torch.no_grad():
            inputs = tuple(t.clone() for t in signature.tensors)  # inference tensors cannot be traced
            exported = torch.export.export(_Bound(self.module, signature), inputs, strict=False)
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, partial = tempfile.mkstemp(dir=self.directory, prefix=".partial-", suffix=".pt2")
            os.close(handle)
            try:
                torch._inductor.aoti_compile_and_package(
                    exported,
                    package_path=partial,
                    inductor_configs={"aot_inductor.package_constants_in_so": False},
                )
                extra = {k: v for k, v in exported.constants.items() if isinstance(v, torch.Tensor)}
                if extra:  # tensors created while tracing: not the module's, so kept beside the package
                    torch.save(extra, str(path) + ".constants")
                os.chmod(partial, 0o644)
                os.replace(partial, path)  # atomic: a worker beside this one never loads half a file
            finally:
                Path(partial).unlink(missing_ok=True)

    def _load(self, path: Path) -> Forward:
        from torch._inductor.package import load_package  # type: ignore[attr-defined]

        model = load_package(str(path))
        state = _state(self.module)
        extra_path = Path(str(path) + ".constants")
        if extra_path.exists():
            state.update(torch.load(extra_path, map_location=self._device(), weights_only=True))
        wanted = model.get_constant_fqns()
        missing = [name for name in wanted if name not in state]
        if missing:
            raise RuntimeError(f"package constants not in the module: {missing[:5]}")
        model.load_constants(
            {name: state[name] for name in wanted}, check_full_update=True, user_managed=True
        )
        forward: Forward = model
        return forward

    def _device(self) -> torch.device:
        return next(self.module.parameters()).device

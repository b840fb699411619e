"""LoRA adapters per job, from an allow-listed folder, loaded once and cached.

The registry is a folder (``SDQ_LORA_DIR``) of ``<name>.safetensors`` files; a job names
adapters by file stem, never by URL or path. The task thread checks that each named file exists
inside the folder and has a LoRA's keys (a safetensors header read, no tensors loaded). The GPU
thread loads an adapter into the shared UNet/text encoder the first time a job uses it
(``load_lora_weights(adapter_name=name)``, PEFT), keeps it while the loaded adapters' file sizes
stay under ``SDQ_LORA_CACHE_MB`` (least recently used ones are deleted first), and activates a
job's set with ``set_adapters(names, weights)``; a job without adapters runs with LoRA disabled.
All three pipelines hold the same modules, so one load serves txt2img, img2img and inpaint.

With a compiled UNet (``SDQ_COMPILE``) adapters are hot-swapped instead: before compiling,
``enable_lora_hotswap(target_rank=SDQ_LORA_MAX_RANK)`` and one adapter slot is loaded; a job's
adapter then replaces that slot's weights in place (``load_lora_weights(hotswap=True)``), with
its scale folded into the weights (changing a PEFT scale would recompile), and a job without an
adapter gets the slot at scale 0 (exactly the base model's output). One adapter per job there.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from safetensors import safe_open

from sdqueue.contract import LoraRef
from sdqueue.errors import JobValidationError

log = logging.getLogger(__name__)
SUFFIX = ".safetensors"


class LoraRegistry:
    """The allow-listed adapter folder: name -> checked file (thread-safe)."""

    def __init__(self, folder: str | None) -> None:
        self.folder = Path(folder).resolve() if folder else None
        self._checked: dict[Path, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(path.stem for path in self.folder.glob(f"*{SUFFIX}"))

    def path_for(self, name: str) -> Path:
        """The checked file of adapter ``name``, or JobValidationError saying what is wrong."""
        if self.folder is None:
            raise JobValidationError("loras: this worker serves no LoRA adapters (SDQ_LORA_DIR is not set)")
        path = (self.folder / f"{name}{SUFFIX}").resolve()
        if path.parent != self.folder or not path.is_file():
            known = ", ".join(self.names()) or "none"
            raise JobValidationError(f"loras: unknown adapter {name!r}; this worker has: {known}")
        self._check(name, path)
        return path

    def is_usable(self, name: str) -> bool:
        try:
            self.path_for(name)
        except JobValidationError as exc:
            log.warning("%s", exc)
            return False
        return True

    def describe(self, loras: list[LoraRef]) -> list[dict[str, Any]]:
        """What the manifest records: each adapter's name, scale and file hash."""
        return [
            {"name": ref.name, "scale": ref.scale, "sha256": self._check(ref.name, self.path_for(ref.name))}
            for ref in loras
        ]

    def _check(self, name: str, path: Path) -> str:
        mtime = path.stat().st_mtime
        with self._lock:
            seen = self._checked.get(path)
        if seen is not None and seen[0] == mtime:
            return seen[1]
        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception as exc:  # safetensors raises its own error types for a broken header
            raise JobValidationError(
                f"loras: adapter {name!r} is not a readable safetensors file ({exc})"
            ) from None
        if not any("lora" in key for key in keys):
            raise JobValidationError(f"loras: {name!r} holds no LoRA weights (no lora_* tensors in the file)")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        with self._lock:
            self._checked[path] = (mtime, digest)
        return digest


HOT_SLOT = "sdq_hot"


class LoraCache:
    """Adapters loaded into the pipeline's modules. GPU thread only."""

    def __init__(self, pipe: Any, registry: LoraRegistry, max_bytes: int) -> None:
        self.pipe = pipe
        self.registry = registry
        self.max_bytes = max_bytes
        self.loaded: OrderedDict[str, int] = OrderedDict()
        self.loads = 0
        self.hot: tuple[str, float] | None = None
        """In hot-swap mode: the (adapter, scale) whose weights the slot holds now."""
        self._state_dicts: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def prepare_hotswap(self, max_rank: int) -> None:
        """Before compiling: switch to hot-swap mode with one slot at scale 0."""
        names = [name for name in self.registry.names() if self.registry.is_usable(name)]
        if not names:
            raise JobValidationError("loras: hot-swap needs at least one usable adapter in SDQ_LORA_DIR")
        self.pipe.enable_lora_hotswap(target_rank=max_rank)
        self.pipe.load_lora_weights(self._scaled(names[0], 0.0), adapter_name=HOT_SLOT)
        self.hot = (names[0], 0.0)

    def apply(self, loras: list[LoraRef]) -> None:
        """Make exactly ``loras`` (names and scales) active for the next pipeline call."""
        if self.hot is not None:
            self._hotswap(loras)
            return
        if not loras:
            if self.loaded:
                self.pipe.disable_lora()
            return
        for lora in loras:
            self._ensure(lora.name, keep={ref.name for ref in loras})
        self.pipe.enable_lora()
        self.pipe.set_adapters([ref.name for ref in loras], adapter_weights=[ref.scale for ref in loras])

    def _ensure(self, name: str, keep: set[str]) -> None:
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return
        path = self.registry.path_for(name)
        size = path.stat().st_size
        self._evict(size, keep)
        try:
            self.pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as exc:  # diffusers/PEFT raise many types for an incompatible adapter
            raise JobValidationError(f"loras: adapter {name!r} does not fit this model ({exc})") from None
        self.loaded[name] = size
        self.loads += 1
        log.info("loaded LoRA %s (%d bytes; %d cached)", name, size, len(self.loaded))

    def _evict(self, incoming: int, keep: set[str]) -> None:
        while self.loaded and sum(self.loaded.values()) + incoming > self.max_bytes:
            victim = next((name for name in self.loaded if name not in keep), None)
            if victim is None:
                return  # the job's own set is over the limit: run it, evict later
            self.pipe.delete_adapters(victim)
            del self.loaded[victim]
            log.info("evicted LoRA %s", victim)

    def _hotswap(self, loras: list[LoraRef]) -> None:
        if len(loras) > 1:
            raise JobValidationError("loras: with a compiled UNet (SDQ_COMPILE) a job may use one adapter")
        assert self.hot is not None
        wanted = (loras[0].name, loras[0].scale) if loras else (self.hot[0], 0.0)
        if wanted == self.hot or (not loras and self.hot[1] == 0.0):
            return
        try:
            self.pipe.load_lora_weights(self._scaled(*wanted), adapter_name=HOT_SLOT, hotswap=True)
        except Exception as exc:  # an adapter over SDQ_LORA_MAX_RANK or for other modules
            raise JobValidationError(f"loras: adapter {wanted[0]!r} cannot be hot-swapped ({exc})") from None
        self.hot = wanted
        self.loads += 1

    def _scaled(self, name: str, scale: float) -> dict[str, Any]:
        """The adapter's state dict (cached on the CPU) with ``scale`` folded into its B matrices."""
        if name not in self._state_dicts:
            state, alphas = self.pipe.lora_state_dict(str(self.registry.path_for(name)))
            if alphas:
                raise JobValidationError(f"loras: {name!r} uses network alphas, which hot-swap cannot fold")
            self._state_dicts[name] = state
            while len(self._state_dicts) > 8:
                self._state_dicts.popitem(last=False)
        self._state_dicts.move_to_end(name)
        return {
            key: tensor * scale if ("lora_B" in key or "lora_up" in key) else tensor
            for key, tensor in self._state_dicts[name].items()
        }

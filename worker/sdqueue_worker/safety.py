"""The NSFW verdict per image, from the model's own safety checker, without blacking anything out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class SafetyChecker:
    """diffusers' StableDiffusionSafetyChecker and its CLIP feature extractor, run by the worker."""

    checker: Any
    feature_extractor: Any

    @classmethod
    def take_from(cls, pipes: list[Any]) -> SafetyChecker:
        """Take the checker off the pipelines (they would black out flagged images)."""
        found = cls(pipes[0].safety_checker, pipes[0].feature_extractor)
        for pipe in pipes:
            pipe.safety_checker = None
        return found

    def flags(self, pixels: np.ndarray) -> list[bool]:
        """One verdict per image of a uint8 (N, H, W, 3) batch."""
        clip = self.feature_extractor(list(pixels), return_tensors="pt").pixel_values
        clip = clip.to(self.checker.device, self.checker.dtype)
        with torch.inference_mode():
            _, nsfw = self.checker(images=pixels.astype(np.float32) / 255.0, clip_input=clip)
        return [bool(flag) for flag in nsfw]

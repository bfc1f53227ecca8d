"""Preprocessed pixels per image, as the batch jobs carry them between their decode tasks and their encoders.

Two layouts, chosen by the base's image processor:
- **Fixed crops** (LLaVA-1.5, LLaVA-OneVision's whole-image crop, composed bases): ``pixels`` (B, C, H, W).
- **Dynamic resolution** (Qwen2.5-VL / Qwen3-VL): each image is its own count of flattened patches, so ``pixels``
  is one (P_i, C * t * p * p) array per image (a numpy object array; Ray Data stores it as a variable-shaped
  tensor column) with ``image_grid_thw`` (B, 3) = (t, h, w) in patches, P_i = t * h * w. The processor's
  ``max_pixels`` (``size["longest_edge"]``) bounds each image's pixels, hence its token count (P_i / merge^2);
  ``bounded`` applies a job's ``--max-pixels`` to it, as passing ``max_pixels`` to the processor does.

A row without an image (a bad file, a text question) holds zeros: (C, 1, 1)-shaped for crops, (0, C') patches and
a (0, 0, 0) grid for dynamic resolution.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np


def is_dynamic(processor: Any) -> bool:
    """Qwen's image processor (flattened patches + image_grid_thw) rather than a fixed-size crop."""
    return getattr(processor, "merge_size", None) is not None and getattr(processor, "temporal_patch_size", None) is not None


def max_pixels_of(processor: Any) -> int | None:
    """The dynamic-resolution processor's pixel bound (None for a fixed-crop processor)."""
    return int(processor.size["longest_edge"]) if is_dynamic(processor) else None


def bounded(processor: Any, max_pixels: int | None) -> Any:
    """The processor with its pixel bound at most ``max_pixels`` (a copy; a fixed-crop processor, or a bound at or
    above the processor's own, comes back as it is)."""
    own = max_pixels_of(processor)
    if own is None or max_pixels is None or max_pixels >= own:
        return processor
    floor = int(processor.size["shortest_edge"])
    if max_pixels < floor:
        raise ValueError(f"max_pixels={max_pixels} is below the image processor's min_pixels={floor}")
    out = copy.deepcopy(processor)
    out.size["longest_edge"] = int(max_pixels)
    return out


def image_tokens(processor: Any, width: int, height: int) -> int:
    """Input positions of a (width x height) image under a dynamic-resolution processor: its resize (a multiple of
    patch x merge within [min_pixels, max_pixels]) in merge units, t * h * w / merge^2 with t = 1 for an image."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    patch, merge = int(processor.patch_size), int(processor.merge_size)
    h, w = smart_resize(height, width, factor=patch * merge, min_pixels=int(processor.size["shortest_edge"]),
                        max_pixels=int(processor.size["longest_edge"]))
    return (h // patch) * (w // patch) // merge**2


def for_job(processor: Any, max_pixels: int) -> tuple[Any, int]:
    """A batch job's ``--max-pixels`` -> (the processor to preprocess with, the decode cap). A fixed-crop base
    refuses larger images (the decompression-bomb cap); a Qwen base resizes them down to it, as its processor's
    ``max_pixels`` does (the cap then stays at least the default bomb guard)."""
    from .images import DEFAULT_MAX_PIXELS

    if not is_dynamic(processor):
        return processor, max_pixels
    return bounded(processor, max_pixels), max(max_pixels, DEFAULT_MAX_PIXELS)


def preprocess(processor: Any, images: list[Any]) -> dict[str, np.ndarray]:
    """PIL images (None for a row without one) -> {"pixels", "image_grid_thw"} in the processor's layout (above);
    fixed crops are LLaVA-OneVision's whole-image crop, as every job feeds the model."""
    good = [i for i, im in enumerate(images) if im is not None]
    done = processor(images=[images[i] for i in good], return_tensors="np") if good else None
    grids = np.zeros((len(images), 3), dtype=np.int64)
    if is_dynamic(processor):
        width = done["pixel_values"].shape[-1] if done is not None else 1
        pixels = np.empty(len(images), dtype=object)
        for i in range(len(images)):
            pixels[i] = np.zeros((0, width), dtype=np.float32)
        if done is not None:
            grid = np.asarray(done["image_grid_thw"], dtype=np.int64)  # (G, 3)
            split = np.split(np.asarray(done["pixel_values"], dtype=np.float32), np.cumsum(grid.prod(-1))[:-1])
            for j, i in enumerate(good):
                pixels[i], grids[i] = split[j], grid[j]
        return {"pixels": pixels, "image_grid_thw": grids}
    from cli_module.model import whole_image_crop

    crops = whole_image_crop(done["pixel_values"]) if done is not None else None
    pixels = np.zeros((len(images), *(crops.shape[1:] if crops is not None else (3, 1, 1))), dtype=np.float32)
    if crops is not None:
        pixels[good] = crops
    return {"pixels": pixels, "image_grid_thw": grids}


def model_inputs(pixels: Any, grids: np.ndarray | None) -> tuple[Any, Any]:
    """Rows of ``preprocess``'s output (after Ray Data: an ndarray or an object array of rows) -> the encoder's
    (pixel_values, image_grid_thw) torch tensors: (B, C, H, W) and None, or (sum P_i, C') and (B, 3)."""
    import torch

    if grids is None or not np.asarray(grids).any():
        return torch.from_numpy(np.ascontiguousarray(np.stack(list(pixels)) if pixels.dtype == object else pixels)), None
    rows = [np.asarray(r, dtype=np.float32) for r in pixels]
    return torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.asarray(grids, dtype=np.int64))

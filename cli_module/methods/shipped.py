"""shipped: the base exactly as published, nothing trained. On Qwen3-VL that is its own DeepStack on (ViT blocks
``deepstack_visual_indexes`` through their mergers, added at the image positions after decoder layers 0, 1, 2),
where ``one_to_one`` turns DeepStack off (the input path only) and ``cli`` sits on top of it; on every other base it
is ``one_to_one``."""

from __future__ import annotations

from .base import Method


class Shipped(Method):
    name = "shipped"
    base_deepstack = True

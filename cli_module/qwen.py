"""Qwen2.5-VL and Qwen3-VL as bases: what differs from LLaVA, in one place.

What the plug-in sees of a Qwen VLM (``Base`` with ``kind`` ``"qwen2_5_vl"`` or ``"qwen3_vl"``):

- **Dynamic resolution.** The image processor resizes each image to a multiple of patch x merge (28 px for
  Qwen2.5-VL, 32 px for Qwen3-VL) within ``[min_pixels, max_pixels]`` and returns flattened patches
  (P, 3 * temporal_patch * patch^2) with ``image_grid_thw`` (B, 3) = (t, h, w) in patches. An image then takes
  N = t * h * w / merge^2 input positions: a count per image, not one per base. ``Base.grid`` is None (no square
  grid: pooling is refused) and ``Base.image_tokens(n)`` is ``n``.
- **Tokens are 2x2 merge units.** The ViT works on patches; its patch merger P (the ``merger``) concatenates each
  merge^2 neighbouring patches (they are consecutive in the processor's order) and maps the m^2 * Dv vector to
  the LLM width. So a vision "token" here is one merge unit: the features the plug-in reads (select layer and the
  layers K) are (N, m^2 * Dv) per image (``Base.feature_dim``), and ``MergerProjector`` applies the merger to
  them, so P(V_select) is exactly what the model puts at its image positions, and AMP's V̂_k = P(V_k) + B_k A_k V_k
  maps every chosen block through the same merger.
- **Which blocks.** hidden_states index k is the output of ViT block k - 1 (0 = the patch embeddings), as for
  LLaVA's encoders; the select layer is the last block (-1), the merger's input. Qwen2.5-VL's blocks attend within
  windows except ``fullatt_block_indexes`` (e.g. 7, 15, 23, 31 of 32): a full-attention block is where every
  token has seen the whole image, so they are natural choices for K. Its blocks run on window-ordered tokens; the
  features here are put back in the processor's order (the model's own ``get_vision_window_index``). Qwen3-VL's
  ViT attends fully in every block; its own DeepStack reads blocks ``deepstack_visual_indexes`` (0-based block
  numbers: hidden_states index + 1).
- **M-RoPE.** The LLM's rotary positions are 3-D (temporal, height, width); an image's tokens get their grid
  positions and the text after an image continues at start + max(h, w) / merge. Positions come from the model's
  own ``get_rope_index`` (prefill) and, while decoding with a cache, the text position plus the row's
  ``rope_delta`` (the model's own offset, from the same function). CLI's injected tokens are keys and values of
  AGF's cross-attention, which has no rotary embedding: AGF's keys carry no position beyond what the ViT's own
  2-D rotary embedding put into the features, for Qwen as for LLaVA.
- **Padding.** Images in one batch have different token counts: the features are padded to the longest
  (``VisionFeatures.grids`` says how many of each row are real) and AGF masks the padded keys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

QWEN_KINDS = ("qwen2_5_vl", "qwen3_vl")
IMAGE_PAD = "<|image_pad|>"  # the placeholder a Qwen chat template writes per image (between vision_start/_end)


def is_qwen(kind: str) -> bool:
    return kind in QWEN_KINDS


def merge_size(base: Any) -> int:
    return base.vision_config.spatial_merge_size


def feature_dim(base: Any) -> int:
    """Width of one vision token the plug-in reads: a merge unit of m^2 patches, m^2 * Dv."""
    return base.vision_config.hidden_size * merge_size(base) ** 2


class MergerProjector(nn.Module):
    """P of a Qwen base: the ViT's patch merger over merge-unit tokens, (..., N, m^2 * Dv) -> (..., N, D).
    Holds the model's own merger (no copy): its parameters are the base's."""

    def __init__(self, merger: nn.Module, patch_dim: int):
        super().__init__()
        self.merger = merger
        self.patch_dim = patch_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, n, _ = x.shape
        out = self.merger(x.reshape(-1, self.patch_dim))  # (prod(lead) * N, D): per patch norm, then per unit MLP
        return out.view(*lead, n, out.shape[-1])


def token_counts(grids: torch.Tensor, merge: int) -> list[int]:
    """image_grid_thw (B, 3) -> input positions of each image: t * h * w / merge^2."""
    return (grids.prod(-1) // merge**2).tolist()


def token_mask(grids: torch.Tensor, merge: int, width: int) -> torch.Tensor:
    """(B, width) bool: which of each row's padded vision tokens are real."""
    counts = torch.tensor(token_counts(grids, merge), device=grids.device)
    return torch.arange(width, device=grids.device)[None] < counts[:, None]


def check_encoder_loaded(base: Any) -> None:
    from .composed import VisionStub

    if isinstance(base.vision_tower.patch_embed, VisionStub):
        raise RuntimeError("the vision encoder is not loaded here (load_base(..., vision=False)): "
                           "features come from the feature cache")


def drop_encoder(base: Any) -> None:
    """``load_base(vision=False)`` on a Qwen base: free the ViT's blocks and patch embedding but keep the merger
    (it is P, which the plug-in trains through) and the config."""
    from .composed import VisionStub

    visual = base.vision_tower
    visual.patch_embed = VisionStub(visual.config)
    visual.blocks = nn.ModuleList()


@torch.no_grad()
def encode(base: Any, pixel_values: torch.Tensor, grids: torch.Tensor, vision_layers: list[int],
           deepstack: bool = False) -> dict:
    """Run the ViT once over flattened patches (P, C*t*p*p) with image_grid_thw ``grids`` (B, 3) -> the fields of
    ``VisionFeatures``: select_features (B, N, m^2 Dv) and layers (B, K, N, m^2 Dv), zero-padded to the longest
    image's N, in the processor's token order, and ``grids``; with ``deepstack`` (Qwen3-VL as shipped) also the
    blocks its own DeepStack reads, (B, len(deepstack_visual_indexes), N, m^2 Dv)."""
    check_encoder_loaded(base)
    visual = base.vision_tower
    weight = next(visual.parameters())
    grids = grids.to(weight.device)
    hidden = visual(pixel_values.to(weight.device, weight.dtype), grid_thw=grids,
                    output_hidden_states=True).hidden_states  # depth + 1 of (P, Dv)
    m2, dv = merge_size(base) ** 2, base.vision_config.hidden_size
    if base.kind == "qwen2_5_vl":  # blocks run on window-ordered merge units: put them back in the processor's order
        from transformers.vision_utils import get_vision_window_index

        cfg = base.vision_config
        window_index, _ = get_vision_window_index(grids, spatial_merge_size=cfg.spatial_merge_size,
                                                  window_size=cfg.window_size, patch_size=cfg.patch_size)
        reverse = torch.argsort(window_index.to(weight.device))

        def units(h: torch.Tensor) -> torch.Tensor:
            return h.view(-1, m2 * dv)[reverse]  # (P / m^2, m^2 Dv)
    else:
        def units(h: torch.Tensor) -> torch.Tensor:
            return h.view(-1, m2 * dv)

    counts = token_counts(grids, merge_size(base))

    def padded(h: torch.Tensor) -> torch.Tensor:  # (P, Dv) -> (B, N, m^2 Dv)
        rows = torch.split(units(h), counts)
        width = max(counts)
        return torch.stack([F.pad(r, (0, 0, 0, width - r.shape[0])) for r in rows])

    from .config import resolve_vision_layers

    select = resolve_vision_layers([base.select_layer], len(hidden) - 1)[0]
    layers = torch.stack([padded(hidden[k]) for k in vision_layers], 1) if vision_layers else None  # (B, K, N, .)
    shipped = None
    if deepstack:  # block i's output is hidden_states[i + 1]
        shipped = torch.stack([padded(hidden[i + 1]) for i in base.vision_config.deepstack_visual_indexes], 1)
    return {"select_features": padded(hidden[select]), "layers": layers, "grids": grids, "deepstack": shipped}


def deepstack_embeds(base: Any, deepstack: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Qwen3-VL's own DeepStack inputs: block ``deepstack_visual_indexes[j]`` (B, J, N, m^2 Dv) through its merger
    ``deepstack_merger_list[j]`` -> per decoder layer j, (image tokens, D) in row order, as the model adds them."""
    mergers = base.vision_tower.deepstack_merger_list
    dv = base.vision_config.hidden_size
    out = []
    for j, merger in enumerate(mergers):
        p = next(merger.parameters())
        embeds = MergerProjector(merger, dv)(deepstack[:, j].to(p.device, p.dtype))  # (B, N, D)
        out.append(torch.cat([e[:n] for e, n in zip(embeds, counts)]))
    return out


def rope_index(base: Any, input_ids: torch.Tensor, image_mask: torch.Tensor, grids: torch.Tensor | None,
               attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own M-RoPE positions (3, B, S) and deltas (B, 1) for a sequence holding its images' tokens;
    ``grids`` (images, 3) in the order the images appear (row by row)."""
    model = base.model.model
    return model.get_rope_index(input_ids, mm_token_type_ids=image_mask.int(), image_grid_thw=grids,
                                attention_mask=attention_mask)


def rope_deltas(base: Any, grids: torch.Tensor) -> torch.Tensor:
    """(B,) the M-RoPE offset each image adds to the positions after it (max(h, w) - h * w in merged units for
    one frame), by the model's own ``get_rope_index`` over the image's tokens alone."""
    merge = merge_size(base)
    out = []
    for grid, n in zip(grids, token_counts(grids, merge)):
        ids = torch.zeros(1, n, dtype=torch.long, device=grids.device)
        _, delta = rope_index(base, ids, torch.ones_like(ids, dtype=torch.bool), grid[None], None)
        out.append(delta.reshape(()))
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.long, device=grids.device)


def positions(base: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              position_ids: torch.Tensor | None, image_mask: torch.Tensor, visual: Any,
              past: int = 0) -> torch.Tensor | None:
    """M-RoPE position ids (3, B, S) of one forward.

    A forward that holds the images' tokens (a prefill or a full forward, 2-D ``attention_mask``) takes the model's
    ``get_rope_index``; a later forward over a cache (no image token in ``input_ids``) takes its text positions
    (``position_ids``, or counted from the 2-D mask, or ``past`` + 0..S-1) plus each image row's delta. 3-D
    ``position_ids`` (3, B, S) are taken as they are."""
    if position_ids is not None and position_ids.dim() == 3:
        return position_ids  # already M-RoPE positions (3, B, S): the decoding engine computes its own
    if visual is None or getattr(visual, "grids", None) is None:
        return position_ids  # text only: the LLM's own 1-D positions, on all three axes
    rows = visual.rows if visual.rows is not None else torch.ones(input_ids.shape[0], dtype=torch.bool,
                                                                   device=input_ids.device)
    if image_mask.any():
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("a Qwen prefill with images needs the 2-D attention mask (B, S) to place M-RoPE "
                             "positions; pass it instead of a prepared 4-D mask")
        pos, _ = rope_index(base, input_ids, image_mask, visual.grids, attention_mask)
        return pos
    if position_ids is None:
        if attention_mask is not None and attention_mask.dim() == 2:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        else:
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None].expand(
                input_ids.shape[0], -1)
    delta = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    delta[rows.to(input_ids.device)] = visual.rope_deltas.to(input_ids.device)
    return (position_ids + delta[:, None])[None].expand(3, -1, -1)

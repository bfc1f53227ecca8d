"""The fused model: a frozen base VLM plus Cross-Layer Injection (AMP + AGF), or one of its baselines.

Data flow of one forward (``method="cli"``):
  pixels ──encoder (frozen, once)──> hidden states V_0..V_L ──┬─ V_select ─> P ─> image token embeddings (input)
                                                            └─ V_k, k in K ─> AMP ─> V̂ (B, K, N, D)
  tokens ─> embeddings ─> decoder layer 0 ─> ... ─> layer t in T ─[AGF: h += W_o Σ_k g_k c_k]─> ... ─> LM head
The base's own input path is untouched; a method's decoder-layer update runs as a forward hook after each decoder
layer in T, reading a per-call ``VisualState`` whose tensors (AGF's keys/values) were computed once per image, so
decoding with the base's KV cache costs one query and one gate per injection layer and step. Precomputed features
(the feature cache) enter as ``VisionFeatures`` and skip the encoder. What differs between CLI and its baselines
(``one_to_one``, ``projector_ft``, ``deepstack``, ``input_fusion``, and ``instruct``, which makes the trained base
CLI sits on) lives in one file per method in ``cli_module.methods``; this file is the part they share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .amp import pool_tokens
from .bases import Base
from .config import CLIConfig, resolve_vision_layers
from .methods import FusionProjector, method_class  # noqa: F401 (FusionProjector: its home before methods/)
from .prompting import tokenize_left_padded


@dataclass
class VisionFeatures:
    """Frozen-encoder outputs the plug-in needs; what the feature cache stores per image."""

    select_features: torch.Tensor  # (C, N, Dv) the select layer (the LLM-input layer) after its select strategy;
    #                                 C crops (C = B if one each)
    layers: torch.Tensor | None  # (B, K, N', Dv) the vision layers K of each image's first crop, pooled
    crops: list[int] | None = None  # crops per image (LLaVA-OneVision anyres); None means one each
    image_sizes: torch.Tensor | None = None  # (B, 2) original sizes, for OneVision's anyres packing
    rows: torch.Tensor | None = None  # (R,) bool: which rows of the batch hold these B images (None: all, B = R)
    grids: torch.Tensor | None = None  # (B, 3) a Qwen base's image_grid_thw: row b's first t*h*w/4 of the N
    #                                    (padded) tokens are real (cli_module.qwen)
    deepstack: torch.Tensor | None = None  # (B, J, N, 4 Dv) the ViT blocks Qwen3-VL's own DeepStack reads, when on


@dataclass
class VisualState:
    """Per-image tensors computed once and reused by every forward of a generation."""

    image_embeds: torch.Tensor | None  # (total image tokens, D) for the input positions
    tokens: torch.Tensor | None  # (B, K, N', D) AMP output V̂
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per injection layer: AGF keys, values (B, H, K, N', A/H)
    counts: list[int]  # image tokens per image: how many <image> placeholders each prompt needs
    rows: torch.Tensor | None = None  # (R,) bool: the batch rows with an image; text-only rows get no injection
    grids: torch.Tensor | None = None  # (B, 3) a Qwen base's image_grid_thw, for its M-RoPE positions
    rope_deltas: torch.Tensor | None = None  # (B,) a Qwen image's M-RoPE offset of the positions after it
    token_mask: torch.Tensor | None = None  # (B, N') bool: the real (unpadded) tokens of ``tokens``; None: all
    deepstack_embeds: list[torch.Tensor] | None = None  # Qwen3-VL's own DeepStack, per decoder layer 0..J-1:
    #                                                     (total image tokens, D), added at the image positions


@dataclass
class FusedOutput:
    logits: torch.Tensor  # (B, S, V)
    loss: torch.Tensor | None = None  # mean next-token cross-entropy over labels != -100
    cache: object | None = None  # the base's KV cache
    gates: torch.Tensor | None = None  # (B, S, |T|, K) AGF gates, when asked for


class FusedVLM(nn.Module):
    def __init__(self, base: Base, config: CLIConfig):
        super().__init__()
        config.validate_for(base.num_vision_layers, base.num_text_layers, base.grid)
        self.base, self.config = base, config
        self.base_model = base.model  # registered, so .to()/.named_parameters() see the base
        self.method = method_class(config.method)()
        # the vision layers K the plug-in reads (non-negative hidden_states indices); none for the other methods
        self.vision_layers = (resolve_vision_layers(config.vision_layers, base.num_vision_layers)
                              if self.method.reads_layers else [])
        self.select_layer = resolve_vision_layers([base.select_layer], base.num_vision_layers)[0]
        with torch.device(next(base.language_model.parameters()).device):
            self.method.attach(self)  # the method's modules, on the LLM's device
        self.projector_modified = self.method.projector_modified  # the adapter carries P (also a stage-1 P)
        self.trains_base = self.method.trains_base  # P and the LLM train: the result is a derived base
        # Qwen3-VL's own DeepStack (as shipped) stays on for every method but one_to_one (cli_module.methods.base)
        self.base_deepstack = base.kind == "qwen3_vl" and self.method.base_deepstack
        self._state: dict | None = None  # set only during a forward: visual state, masks, gate sink
        self._hooks = [base.language_model.layers[t].register_forward_hook(self._make_hook(i))
                       for i, t in enumerate(config.inject_layers)] if self.method.hooks_layers else []
        self.mark_trainable()

    # --- parameters ---------------------------------------------------------------------------------

    def mark_trainable(self) -> None:
        """Only the method's own parameters train; the base stays frozen unless the method trains a part of it
        (projector_ft: P; instruct: P and the LLM, never the encoder)."""
        self.base.model.requires_grad_(False)
        for name, p in self.named_parameters():
            p.requires_grad_(not name.startswith("base_model."))
        self.method.mark_trainable(self)

    def param_counts(self) -> dict[str, float | int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"total_params": total, "trainable_params": trainable,
                "trainable_percent": round(100.0 * trainable / total, 4)}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What an adapter file holds: the plug-in's weights (with those a method inserted inside the base, such
        as llm_lora's), and P's when it was trained or replaced."""
        state = {n: p.detach() for n, p in self.named_parameters() if not n.startswith("base_model.")}
        state.update({n: p.detach() for n, p in self.method.base_parameters(self).items()})  # llm_lora's
        if self.projector_modified:
            state.update({f"projector.{n}": p.detach() for n, p in self.base.projector.named_parameters()})
        return state

    def zero_gates(self, vision_layers: list[int] | tuple[int, ...] = ()) -> None:
        """Ablation switch: AGF's gates of these vision layers (encoder hidden-state indices, as in
        ``self.vision_layers``) are 0 at every injection layer from now on; ``()`` restores the trained gates.
        Zeroing every layer gives exactly the model without AGF (the base's own input path): one-to-one."""
        if vision_layers and self.config.method != "cli":
            raise ValueError(f"zero_gates needs a CLI adapter (method 'cli'); this model is {self.config.method!r}, "
                             f"which has no AGF gates")
        unknown = sorted(set(vision_layers) - set(self.vision_layers))
        if unknown:
            raise ValueError(f"vision layer(s) {unknown} are not among this adapter's vision_layers "
                             f"{self.vision_layers}; zero one of those")
        positions = tuple(sorted(self.vision_layers.index(k) for k in set(vision_layers)))
        for agf in getattr(self, "agf", []):
            agf.zeroed = positions

    # --- vision ---------------------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None, *,
                      image_grid_thw: torch.Tensor | None = None) -> VisionFeatures:
        """Run the frozen encoder once: (B, C, H, W), OneVision's (B, P, C, H, W) or a Qwen base's flattened patches
        (P, C*t*p*p) with ``image_grid_thw`` (B, 3) -> VisionFeatures."""
        return encode_images(self.base, pixel_values, self.vision_layers, self.config.pool, image_sizes,
                             image_grid_thw=image_grid_thw, deepstack=self.base_deepstack)

    def prepare_visual(self, vf: VisionFeatures) -> VisualState:
        """Project the features for the input path and compute the method's tokens (AMP, AGF keys/values), once
        per image."""
        image_embeds = self.method.image_embeds(self, vf)  # (C, N, D)
        qwen = {}
        if self.base.qwen:  # variable counts: each image's real tokens, in row order
            from .qwen import merge_size, rope_deltas, token_counts, token_mask

            if vf.grids is None:
                raise ValueError("a Qwen base's features need their image_grid_thw (VisionFeatures.grids)")
            counts = token_counts(vf.grids, merge_size(self.base))
            image_embeds = torch.cat([e[:n] for e, n in zip(image_embeds, counts)])  # (total image tokens, D)
            mask = token_mask(vf.grids, merge_size(self.base), vf.select_features.shape[1])  # (B, N)
            qwen = {"grids": vf.grids, "rope_deltas": rope_deltas(self.base, vf.grids),
                    "token_mask": None if bool(mask.all()) else mask.to(image_embeds.device)}
            if self.base_deepstack:
                from .qwen import deepstack_embeds

                if vf.deepstack is None:
                    raise ValueError("these features lack the ViT blocks Qwen3-VL's own DeepStack reads "
                                     f"({self.base.vision_config.deepstack_visual_indexes}); encode the images "
                                     "with this model (or a feature cache written for it), or use method one_to_one")
                qwen["deepstack_embeds"] = deepstack_embeds(self.base, vf.deepstack, counts)
        elif self.base.kind == "llava_onevision":
            m = self.base.model.model
            per_image = torch.split(image_embeds, vf.crops or [1] * image_embeds.shape[0])
            sizes = vf.image_sizes if vf.image_sizes is not None else [None] * len(per_image)
            packed, _ = m.pack_image_features(per_image, sizes, image_newline=m.image_newline,
                                              vision_aspect_ratio=m.config.vision_aspect_ratio)
            counts = [p.shape[0] for p in packed]
            image_embeds = torch.cat(packed)  # (total image tokens, D)
        else:
            counts = [image_embeds.shape[1]] * image_embeds.shape[0]
            image_embeds = image_embeds.flatten(0, 1)
        tokens, kv = self.method.visual_tokens(self, vf)  # (B, K, N', D) or None; per injection layer
        return VisualState(image_embeds=image_embeds, tokens=tokens, kv=kv, counts=counts, rows=vf.rows, **qwen)

    def projector_place(self) -> tuple[torch.device, torch.dtype]:
        """P's device and dtype: where features go before the projector."""
        p = next(self.base.projector.parameters())
        return p.device, p.dtype

    # --- language model with injection ---------------------------------------------------------------

    def _make_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            state = self._state
            if state is None or state["visual"] is None:
                return output
            hidden = output[0] if isinstance(output, tuple) else output  # (B, S, D)
            update = self.method.inject(self, i, hidden, state)
            if state["gates"] is not None and update.gates is not None:
                state["gates"].append(update.gates)
            return (update.hidden, *output[1:]) if isinstance(output, tuple) else update.hidden

        return hook

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                pixel_values: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                features: VisionFeatures | None = None, visual: VisualState | None = None,
                labels: torch.Tensor | None = None, cache: object | None = None, use_cache: bool = False,
                return_gates: bool = False, logits_to_keep: int = 0, float_logits: bool = False,
                position_ids: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None) -> FusedOutput:
        """input_ids (B, S); images as pixels (a Qwen base's with their ``image_grid_thw``), cached features, or an
        already prepared VisualState.
        ``attention_mask`` (B, S) or, from the decoding engine, a prepared 4-D mask (B, 1, S, L) with its
        ``position_ids`` (B, S).
        ``float_logits``: the LM head in fp32 on a bf16/fp16 model (likelihood scoring: bf16 logits step by 0.125
        at |16| to 32, so candidates' scores tie and the first listed wins)."""
        if visual is None and (pixel_values is not None or features is not None):
            features = features if features is not None else self.encode_images(
                pixel_values, image_sizes, image_grid_thw=image_grid_thw)
            visual = self.prepare_visual(features)
        lm = self.base.language_model
        embeds = lm.embed_tokens(input_ids)  # (B, S, D)
        image_mask = input_ids == self.base.image_token_id  # (B, S)
        if visual is not None and image_mask.any():
            n_tok, n_feat = int(image_mask.sum()), visual.image_embeds.shape[0]
            if n_tok != n_feat:
                raise ValueError(f"image tokens and features do not match: tokens {n_tok}, features {n_feat}; "
                                 f"expand each <image> to the encoder's token count")
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), visual.image_embeds.to(embeds.dtype))
        if self.base.qwen:  # M-RoPE: the model's own positions for the image tokens and the text after them
            from .qwen import positions

            past = cache.get_seq_length() if cache is not None and position_ids is None else 0
            position_ids = positions(self.base, input_ids, attention_mask, position_ids, image_mask, visual, past)
        if position_ids is None and attention_mask is not None:  # left padding: positions count real tokens only
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        update_mask = {"all": None, "image": image_mask, "text": ~image_mask}[self.config.positions]
        self._state = {"visual": visual, "image_mask": image_mask, "update_mask": update_mask,
                       "gates": [] if return_gates else None}
        try:
            shipped = {}  # Qwen3-VL's own DeepStack: the model's code adds it after decoder layers 0..J-1
            if visual is not None and visual.deepstack_embeds is not None and image_mask.any():
                shipped = {"visual_pos_masks": image_mask, "deepstack_visual_embeds": visual.deepstack_embeds}
            out = lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=use_cache, **{_cache_kwarg(lm): cache}, **shipped)
            gates = torch.stack(self._state["gates"], dim=2) if return_gates and self._state["gates"] else None
        finally:
            self._state = None
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        head = self.base.lm_head
        if float_logits and hidden.dtype != torch.float32:
            bias = None if head.bias is None else head.bias.float()
            logits = F.linear(hidden.float(), head.weight.float(), bias)  # (B, S, V) fp32
        else:
            logits = head(hidden)  # (B, S, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        kv = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return FusedOutput(logits=logits, loss=loss, cache=kv if use_cache else None, gates=gates)

    # --- inputs ----------------------------------------------------------------------------------------

    def prepare_inputs(self, prompts: list[str], images: list | None = None,
                       features: VisionFeatures | None = None, *,
                       anyres: bool = False) -> tuple[dict[str, torch.Tensor], VisualState | None]:
        """Prompts holding one ``<image>`` each, plus PIL images or cached features -> left-padded ids and the
        visual state; each ``<image>`` is expanded to that image's token count. LLaVA-OneVision images enter as
        their whole-image crop only (``whole_image_crop``), as the feature cache stores them, so training, eval,
        captioning and serving see the same input; ``anyres=True`` adds the anyres tiles, as the hub model does."""
        visual = None
        if images is not None:
            proc = self.base.image_processor(images=images, return_tensors="pt")
            if self.base.qwen:  # dynamic resolution: flattened patches and each image's grid
                features = self.encode_images(proc["pixel_values"], image_grid_thw=proc["image_grid_thw"])
            elif anyres:
                features = self.encode_images(proc["pixel_values"], proc.get("image_sizes"))
            else:
                features = self.encode_images(whole_image_crop(proc["pixel_values"]))
        if features is not None:
            visual = self.prepare_visual(features)
        image_token = self.base.tokenizer.convert_ids_to_tokens(self.base.image_token_id)
        texts = []
        for i, prompt in enumerate(prompts):
            n = prompt.count(image_token)
            if visual is None and n:
                raise ValueError(f"prompt {i} has {n} {image_token} placeholder(s) but no image was given")
            if visual is not None and n != 1:
                raise ValueError(f"prompt {i} must hold exactly one {image_token} placeholder, found {n}")
            texts.append(prompt.replace(image_token, image_token * visual.counts[i]) if n else prompt)
        input_ids, attention_mask = tokenize_left_padded(self.base.tokenizer, texts)  # (B, L) each
        device = self.projector_place()[0]
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}, visual


def crop_tokens(base: Base) -> int:
    """Select-layer features of one whole-image crop (N): found by running the encoder on one blank crop, on the
    meta device when the base is there (shapes only, no compute)."""
    return int(encode_images(base, blank_crop(base), []).select_features.shape[1])


def blank_crop(base: Base) -> torch.Tensor:
    """One zero image (1, 3, H, W) at the size the base's processor crops to, on the encoder's device and dtype."""
    weight = next(base.vision_tower.parameters())
    side = base.grid * base.vision_config.patch_size  # the processor's crop (e.g. 112 px for `small`)
    return torch.zeros(1, 3, side, side, device=weight.device, dtype=weight.dtype)


def whole_image_crop(pixel_values):
    """LLaVA-OneVision's anyres pixels (B, P, C, H, W) -> the whole-image (base) crop (B, C, H, W), which comes
    first; 4-D pixels pass as they are. Works on torch tensors and numpy arrays alike."""
    return pixel_values[:, 0] if pixel_values.ndim == 5 else pixel_values


@torch.no_grad()
def encode_images(base: Base, pixel_values: torch.Tensor, vision_layers: list[int], pool: int = 1,
                  image_sizes: torch.Tensor | None = None, *,
                  image_grid_thw: torch.Tensor | None = None, deepstack: bool = False) -> VisionFeatures:
    """The frozen encoder's features for the plug-in: its select layer, and ``vision_layers`` of each image's first
    crop after the select strategy and pooling. Used by the fused model and by the feature-cache writer. A Qwen
    base reads flattened patches with their ``image_grid_thw`` and gives merge-unit tokens padded per image
    (``cli_module.qwen.encode``; no pooling); ``deepstack``: also the blocks Qwen3-VL's own DeepStack reads."""
    if base.qwen:
        from .qwen import encode

        if image_grid_thw is None:
            raise ValueError("a Qwen base's pixels come with image_grid_thw (B, 3): pass the image processor's")
        if pool != 1:
            raise ValueError(f"pool={pool}: a Qwen base's token grid varies per image; use pool=1")
        return VisionFeatures(**encode(base, pixel_values, image_grid_thw, vision_layers, deepstack))
    crops = None
    if pixel_values.dim() == 5:  # OneVision anyres: keep each image's real crops only
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        cfg = base.model.config
        crops = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                 for s in image_sizes]
        pixel_values = torch.cat([pv[:c] for pv, c in zip(pixel_values, crops)])
    weight = next(base.vision_tower.parameters(), pixel_values)  # a VisionStub has none (and raises when called)
    hidden = base.vision_tower(pixel_values.to(weight.device, weight.dtype), output_hidden_states=True).hidden_states
    first = torch.tensor([0, *torch.tensor(crops).cumsum(0)[:-1].tolist()]) if crops else slice(None)
    select_features = base.select(hidden[base.select_layer])  # (C, N, Dv)
    layers = None
    if vision_layers:
        layers = torch.stack([base.select(hidden[k])[first] for k in vision_layers], 1)  # (B, K, N, Dv)
        layers = pool_tokens(layers, pool)  # (B, K, N', Dv)
    return VisionFeatures(select_features=select_features, layers=layers, crops=crops, image_sizes=image_sizes)


def _cache_kwarg(lm: nn.Module) -> str:
    """transformers renamed the decoder's ``past_key_values`` argument to ``cache`` (5.2x); accept both."""
    import inspect

    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

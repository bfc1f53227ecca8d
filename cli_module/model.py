"""The fused model: a frozen base VLM plus Cross-Layer Injection (AMP + AGF), or one of its baselines.

Data flow of one forward (``method="cli"``):
  pixels ──encoder (frozen, once)──> hidden states V_0..V_L ──┬─ V_select ─> P ─> image token embeddings (input)
                                                            └─ V_k, k in K ─> AMP ─> V̂ (B, K, N, D)
  tokens ─> embeddings ─> decoder layer 0 ─> ... ─> layer t in T ─[AGF: h += W_o Σ_k g_k c_k]─> ... ─> LM head
The base's own input path is untouched; AGF runs as a forward hook after each decoder layer in T, reading a
per-call ``VisualState`` whose AGF keys/values were computed once per image, so decoding with the base's KV
cache costs one query and one gate per injection layer and step. Precomputed features (the feature cache)
enter as ``VisionFeatures`` and skip the encoder. Baselines share every line except their trainable part:
``one_to_one`` (nothing), ``projector_ft`` (P), ``instruct`` (P and the LLM: LLaVA's visual instruction tuning,
which makes the trained base CLI sits on; saved as a derived base, ``cli_module.derived``), ``deepstack`` (W_i V̂_{k_i} added at the image positions of layer
t_i, W_i a zero-initialised D x D map like AGF's W_o), ``input_fusion`` (layers concatenated into a widened
projector).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .agf import AGF
from .amp import AMP, pool_tokens
from .bases import Base
from .config import CLIConfig, resolve_vision_layers


@dataclass
class VisionFeatures:
    """Frozen-encoder outputs the plug-in needs; what the feature cache stores per image."""

    select_features: torch.Tensor  # (C, N, Dv) the select layer (the LLM-input layer) after its select strategy;
    #                                 C crops (C = B if one each)
    layers: torch.Tensor | None  # (B, K, N', Dv) the vision layers K of each image's first crop, pooled
    crops: list[int] | None = None  # crops per image (LLaVA-OneVision anyres); None means one each
    image_sizes: torch.Tensor | None = None  # (B, 2) original sizes, for OneVision's anyres packing
    rows: torch.Tensor | None = None  # (R,) bool: which rows of the batch hold these B images (None: all, B = R)


@dataclass
class VisualState:
    """Per-image tensors computed once and reused by every forward of a generation."""

    image_embeds: torch.Tensor | None  # (total image tokens, D) for the input positions
    tokens: torch.Tensor | None  # (B, K, N', D) AMP output V̂
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per injection layer: AGF keys, values (B, H, K, N', A/H)
    counts: list[int]  # image tokens per image: how many <image> placeholders each prompt needs
    rows: torch.Tensor | None = None  # (R,) bool: the batch rows with an image; text-only rows get no injection


@dataclass
class FusedOutput:
    logits: torch.Tensor  # (B, S, V)
    loss: torch.Tensor | None = None  # mean next-token cross-entropy over labels != -100
    cache: object | None = None  # the base's KV cache
    gates: torch.Tensor | None = None  # (B, S, |T|, K) AGF gates, when asked for


class FusionProjector(nn.Module):
    """input_fusion baseline: P's first linear widened to take [V_select ; V_k1 ; ...]; new blocks start at 0."""

    def __init__(self, projector: nn.Module, num_extra: int):
        super().__init__()
        old = projector.linear_1
        self.linear_1 = nn.Linear(old.in_features * (1 + num_extra), old.out_features, bias=old.bias is not None)
        with torch.no_grad():
            self.linear_1.weight.zero_()
            self.linear_1.weight[:, : old.in_features] = old.weight
            if old.bias is not None:
                self.linear_1.bias.copy_(old.bias)
        self.act = projector.act
        self.linear_2 = nn.Linear(projector.linear_2.in_features, projector.linear_2.out_features,
                                  bias=projector.linear_2.bias is not None)
        self.linear_2.load_state_dict(projector.linear_2.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class FusedVLM(nn.Module):
    def __init__(self, base: Base, config: CLIConfig):
        super().__init__()
        config.validate_for(base.num_vision_layers, base.num_text_layers, base.grid)
        self.base, self.config = base, config
        self.base_model = base.model  # registered, so .to()/.named_parameters() see the base
        reads_layers = config.method in ("cli", "deepstack", "input_fusion")
        # the vision layers K the plug-in reads (non-negative hidden_states indices); none for the other methods
        self.vision_layers = resolve_vision_layers(config.vision_layers, base.num_vision_layers) if reads_layers else []
        self.select_layer = resolve_vision_layers([base.select_layer], base.num_vision_layers)[0]
        dv, d = base.vision_config.hidden_size, base.text_config.hidden_size
        device = next(base.language_model.parameters()).device
        with torch.device(device):
            if config.method in ("cli", "deepstack"):
                self.amp = AMP(len(self.vision_layers), dv, d, config.lora_rank, config.lora_alpha, config.dropout)
            if config.method == "cli":
                self.agf = nn.ModuleList(AGF(d, config.attn_dim, len(self.vision_layers), config.heads, config.gate,
                                             config.dropout, config.gate_init) for _ in config.inject_layers)
            if config.method == "deepstack":
                # zero-initialised per-layer output maps: the untrained baseline adds exactly zero. (A zero-init
                # scalar scale cannot grow past ~lr per Adam step, so that baseline barely trained.)
                self.deepstack_out = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in config.inject_layers)
                for layer in self.deepstack_out:
                    nn.init.zeros_(layer.weight)
            if config.method == "input_fusion":
                self.fusion_layers = [k for k in self.vision_layers if k != self.select_layer]
                self.fusion_projector = FusionProjector(base.projector, len(self.fusion_layers))
        self.projector_modified = config.method == "projector_ft"  # the adapter then carries P's weights
        self.trains_base = config.method == "instruct"  # P and the LLM train: the result is a derived base
        self._state: dict | None = None  # set only during a forward: visual state, masks, gate sink
        self._hooks = [base.language_model.layers[t].register_forward_hook(self._make_hook(i))
                       for i, t in enumerate(config.inject_layers)] if config.method in ("cli", "deepstack") else []
        self.mark_trainable()

    # --- parameters ---------------------------------------------------------------------------------

    def mark_trainable(self) -> None:
        """Only the method's own parameters train; the base stays frozen (P too, unless projector_ft; instruct
        trains P and the LLM, never the encoder)."""
        self.base.model.requires_grad_(False)
        for name, p in self.named_parameters():
            p.requires_grad_(not name.startswith("base_model."))
        if self.config.method in ("projector_ft", "instruct"):
            self.base.projector.requires_grad_(True)
        if self.config.method == "instruct":
            self.base.language_model.requires_grad_(True)
            self.base.lm_head.requires_grad_(True)

    def param_counts(self) -> dict[str, float | int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"total_params": total, "trainable_params": trainable,
                "trainable_percent": round(100.0 * trainable / total, 4)}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What an adapter file holds: the plug-in's weights, and P's when it was trained or replaced."""
        state = {n: p.detach() for n, p in self.named_parameters() if not n.startswith("base_model.")}
        if self.projector_modified:
            state.update({f"projector.{n}": p.detach() for n, p in self.base.projector.named_parameters()})
        return state

    # --- vision ---------------------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> VisionFeatures:
        """Run the frozen encoder once: (B, C, H, W) or OneVision's (B, P, C, H, W) -> VisionFeatures."""
        return encode_images(self.base, pixel_values, self.vision_layers, self.config.pool, image_sizes)

    def prepare_visual(self, vf: VisionFeatures) -> VisualState:
        """Project the features for the input path and compute AMP tokens and AGF keys/values (once per image)."""
        if self.config.method == "input_fusion":
            extra = [vf.layers[:, self.vision_layers.index(k)] for k in self.fusion_layers]  # each (B, N, Dv)
            image_embeds = self.fusion_projector(torch.cat([vf.select_features, *extra], dim=-1).to(*self._where()))
        else:
            image_embeds = self.base.projector(vf.select_features.to(*self._where()))  # (C, N, D)
        if self.base.kind == "llava_onevision":
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
        tokens, kv = None, []
        if self.config.method in ("cli", "deepstack"):
            tokens = self.amp(vf.layers, self.base.projector)  # (B, K, N', D)
        if self.config.method == "cli":
            kv = [agf.project_kv(tokens) for agf in self.agf]
        return VisualState(image_embeds=image_embeds, tokens=tokens, kv=kv, counts=counts, rows=vf.rows)

    def _where(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.base.projector.parameters())
        return p.device, p.dtype

    # --- language model with injection ---------------------------------------------------------------

    def _make_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            state = self._state
            if state is None or state["visual"] is None:
                return output
            hidden = output[0] if isinstance(output, tuple) else output  # (B, S, D)
            rows = state["visual"].rows  # (B,) bool, or None: every row holds an image
            if self.config.method == "cli":
                mask = state["update_mask"]
                if rows is None:
                    hidden, gates = self.agf[i](hidden, state["visual"].kv[i], mask)
                else:  # mixed batch: only the rows with an image read it; text-only rows pass unchanged
                    sub, sub_gates = self.agf[i](hidden[rows], state["visual"].kv[i], None if mask is None else mask[rows])
                    hidden = hidden.clone()
                    hidden[rows] = sub
                    gates = sub_gates.new_zeros((hidden.shape[0], *sub_gates.shape[1:]))  # (B, S, K)
                    gates[rows] = sub_gates
                if state["gates"] is not None:
                    state["gates"].append(gates)
            else:  # deepstack: static add of V̂_{k_i} at this layer's image positions (prefill only)
                img = state["image_mask"]
                if img is not None and img.any():
                    add = self.deepstack_out[i](state["visual"].tokens[:, i].flatten(0, 1))  # (B*N, D)
                    hidden = hidden.masked_scatter(img.unsqueeze(-1), hidden[img] + add.to(hidden.dtype))
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                pixel_values: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                features: VisionFeatures | None = None, visual: VisualState | None = None,
                labels: torch.Tensor | None = None, cache: object | None = None, use_cache: bool = False,
                return_gates: bool = False, logits_to_keep: int = 0, float_logits: bool = False,
                position_ids: torch.Tensor | None = None) -> FusedOutput:
        """input_ids (B, S); images as pixels, cached features, or an already prepared VisualState.
        ``attention_mask`` (B, S) or, from the decoding engine, a prepared 4-D mask (B, 1, S, L) with its
        ``position_ids`` (B, S).
        ``float_logits``: the LM head in fp32 on a bf16/fp16 model (likelihood scoring: bf16 logits step by 0.125
        at |16| to 32, so candidates' scores tie and the first listed wins)."""
        if visual is None and (pixel_values is not None or features is not None):
            features = features if features is not None else self.encode_images(pixel_values, image_sizes)
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
        if position_ids is None and attention_mask is not None:  # left padding: positions count real tokens only
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        update_mask = {"all": None, "image": image_mask, "text": ~image_mask}[self.config.positions]
        self._state = {"visual": visual, "image_mask": image_mask, "update_mask": update_mask,
                       "gates": [] if return_gates else None}
        try:
            out = lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=use_cache, **{_cache_kwarg(lm): cache})
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
            if anyres:
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
        tok = self.base.tokenizer
        tok.padding_side = "left"
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        device = self._where()[0]
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}, visual


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
                  image_sizes: torch.Tensor | None = None) -> VisionFeatures:
    """The frozen encoder's features for the plug-in: its select layer, and ``vision_layers`` of each image's first
    crop after the select strategy and pooling. Used by the fused model and by the feature-cache writer."""
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

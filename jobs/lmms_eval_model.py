"""The lmms-eval model ``crosslayer``: any lmms-eval task (MME, MMBench, POPE, ...) on a CLI adapter or a bare base.

    lmms-eval --model crosslayer --model_args adapter=out/adapter[,base=NAME][,dtype=bfloat16][,zero_gates=4+8]
              --tasks pope,mme --batch_size 8

Registered through lmms-eval's model entry points (group ``lmms_eval.models``, ``pyproject.toml``), so installing
crosslayer with its ``lmms`` extra is all it takes. Model arguments: ``adapter`` (folder or s3://; without it,
``base`` alone is evaluated as is: one-to-one), ``base`` (default: the adapter's), ``dtype`` (auto: bfloat16 on
cuda, float32 on cpu), ``device`` (auto, cpu, cuda, cuda:N; lmms-eval's ``--device`` also lands here),
``zero_gates`` (an ablation: AGF's gates of these vision layers set to 0, ``4+8`` or ``all``:
``FusedVLM.zero_gates``) and ``batch_size``.

Each request is asked as ``crosslayer eval`` asks a question: the task's text as the user turn, ``<image>`` in
front of it when the task gives an image and no placeholder, rendered by the base's chat template
(``cli_module.prompting``), the image through the base's processor (whole-image crop), answers decoded by
``pipelines.generation.complete`` (greedy unless the task sets a temperature), likelihoods by
``jobs.eval_choice`` (the candidate as the assistant's reply). So the same question gets the same answer and the
same log-likelihood here as through `crosslayer eval` (tested).

Sign convention: ``loglikelihood`` returns (negative log-likelihood summed over the continuation's tokens,
is_greedy), as lmms-eval's own llava wrappers return the loss (positive) and its multiple-choice scoring takes the
argmin; the sum (not the llava wrappers' mean) keeps `crosslayer eval --scoring choice`'s ranking.
One process, one device: run several tasks as several Ray jobs for more GPUs (README).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

GEN_KEYS = {"until", "max_new_tokens", "temperature", "top_p", "do_sample", "num_beams"}
IMAGE = "<image>"


def manifest():
    """The entry point lmms-eval reads (group ``lmms_eval.models``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="crosslayer", simple_class_path="jobs.lmms_eval_model.CrossLayer")


def parse_zero_gates(value: Any, vision_layers: list[int]) -> list[int]:
    """``zero_gates`` model argument -> vision layers: an int, ``"4+8"``, ``"all"``, or empty for none."""
    if value is None or value == "":
        return []
    if str(value).strip().lower() == "all":
        return list(vision_layers)
    try:
        return [int(v) for v in str(value).split("+")]
    except ValueError:
        raise ValueError(f"zero_gates={value!r}: give vision layers joined by '+' (e.g. 4+8), or 'all'") from None


def _skip_filelock_patch() -> None:
    """lmms-eval 0.7.3's evaluator patches ``filelock._api``, which filelock 4 (this project's pin) no longer has, and
    then fails every run. The patch guards datasets' and filelock's locks against a cross-class deadlock among
    processes sharing a cache; a single process loading its tasks in turn does not need it, so mark it done."""
    import importlib.util
    import sys

    evaluator = sys.modules.get("lmms_eval.evaluator")
    if evaluator is not None and importlib.util.find_spec("filelock._api") is None:
        patch = getattr(evaluator, "_enable_reentrant_filelocks", None)
        if patch is not None:
            patch._patched = True


class CrossLayer(lmms):
    """lmms-eval's simple (text + images) model interface over ``FusedVLM``."""

    is_simple = True

    def __init__(self, adapter: str | None = None, base: str | None = None, dtype: str = "auto",
                 device: str | None = "auto", zero_gates: Any = "", batch_size: int | str = 1,
                 max_batch_size: int | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"crosslayer: unknown model_args {sorted(unknown)}; it takes adapter, base, dtype, "
                             f"device, zero_gates, batch_size")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("crosslayer runs one process on one device; for more GPUs run one lmms-eval per "
                             "task (or task shard) as separate Ray jobs instead of accelerate launch")
        from cli_module.adapter import load_model
        from pipelines.generation import offline_engine

        _skip_filelock_patch()
        device = "cuda" if device in (None, "auto") and torch.cuda.is_available() else device
        device = "cpu" if device in (None, "auto") else str(device)
        dtypes = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
                  "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in dtypes:
            raise ValueError(f"crosslayer: dtype={dtype!r} is not one of {sorted(dtypes)}")
        if str(batch_size).startswith("auto") or int(batch_size) < 1:
            raise ValueError(f"crosslayer: batch_size={batch_size!r}; give a positive integer")
        self.batch_size_per_gpu = int(batch_size)
        model, self.model_id = load_model(adapter, base, dtype=dtypes[dtype])
        self.model = model.to(device).eval()
        self.engine = offline_engine(self.model)  # one decoding engine for every request
        if zero_gates not in (None, "") and self.model.config.method != "cli":
            raise ValueError(f"crosslayer: zero_gates needs a CLI adapter; {adapter or base} is "
                             f"{self.model.config.method!r}, which has no AGF gates")
        self.model.zero_gates(parse_zero_gates(zero_gates, self.model.vision_layers))
        self.device = device

    # --- prompts ----------------------------------------------------------------------------------------

    def _visuals(self, request: Instance) -> list:
        args = request.args
        doc = self.task_dict[args[-2]][args[-1]][args[-3]]
        visuals = [v for v in (args[2](doc) or []) if v is not None]
        if len(visuals) > 1:
            raise ValueError(f"task {args[-2]} doc {args[-3]}: {len(visuals)} images; crosslayer models take one "
                             f"image per question")
        if visuals and not hasattr(visuals[0], "convert"):
            raise ValueError(f"task {args[-2]}: visuals of type {type(visuals[0]).__name__}; crosslayer takes "
                             f"PIL images (no video or audio)")
        return [v.convert("RGB") for v in visuals]

    def _messages(self, context: str, has_image: bool) -> list[dict[str, str]]:
        if has_image and IMAGE not in context:
            context = f"{IMAGE}\n{context}"
        return [{"role": "user", "content": context}]

    def _inputs(self, messages: list[list[dict[str, str]]], images: list | None):
        from cli_module.prompting import render

        tok, family = self.model.base.tokenizer, self.model.base.kind
        prompts = [render(tok, m, add_generation_prompt=True, family=family) for m in messages]
        return self.model.prepare_inputs(prompts, images=images)

    # --- lmms-eval's interface ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        from pipelines.generation import Sampling, complete

        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            sampling = self._sampling(r.args[1], Sampling)
            has_image = bool(self._visuals(r))
            groups.setdefault((repr(sampling), has_image), []).append(i)
        for (_, has_image), idx in groups.items():
            for at in range(0, len(idx), self.batch_size_per_gpu):
                chunk = idx[at: at + self.batch_size_per_gpu]
                sampling = self._sampling(requests[chunk[0]].args[1], Sampling)
                images = [self._visuals(requests[i])[0] for i in chunk] if has_image else None
                inputs, visual = self._inputs([self._messages(requests[i].args[0], has_image) for i in chunk], images)
                for i, done in zip(chunk, complete(self.model, inputs, visual, sampling, self.engine)):
                    out[i] = done.text
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], done.text)
        return [str(x) for x in out]

    @staticmethod
    def _sampling(gen_kwargs: dict, sampling_cls: Callable) -> Any:
        extra = sorted(set(gen_kwargs) - GEN_KEYS)
        if extra:
            raise ValueError(f"crosslayer: generation_kwargs {extra} are not supported (it honours "
                             f"{sorted(GEN_KEYS)})")
        if int(gen_kwargs.get("num_beams", 1) or 1) != 1:
            raise ValueError("crosslayer: num_beams > 1 (beam search) is not supported; use num_beams 1")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        if gen_kwargs.get("do_sample") is False:
            temperature = 0.0
        return sampling_cls(max_new_tokens=int(gen_kwargs.get("max_new_tokens", 32)), temperature=temperature,
                            top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0), stop=[s for s in until if s])

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        """Per request (context, continuation): (NLL of the continuation, whether greedy decoding produces it), each
        wrapped in lmms-eval's ``GenerationResult``: 0.7.3's evaluator turns any other non-string model output into
        its ``str()`` (``unwrap_generation_output``), tuples included, which breaks multiple-choice scoring; the
        wrapper hands the tuple through unchanged."""
        from lmms_eval.api.instance import GenerationResult

        from .eval_choice import continuation_ids, score_continuations

        tok, family = self.model.base.tokenizer, self.model.base.kind
        out = []
        for r in requests:
            context, target = r.args[0], r.args[1]
            if callable(target):
                target = target(self.task_dict[r.args[-2]][r.args[-1]][r.args[-3]])
            target = target[0] if isinstance(target, list) else target
            images = self._visuals(r)
            messages = self._messages(context, bool(images))
            ids = continuation_ids(tok, messages, str(target), family=family)
            inputs, visual = self._inputs([messages], images or None)
            (score,), = score_continuations(self.model, inputs, visual, [[ids]])
            is_greedy = self._greedy_produces(inputs, visual, ids)
            pair = (-float(score), bool(is_greedy))
            self.cache_hook.add_partial("loglikelihood", r.args[:2], pair)
            out.append(GenerationResult(text=pair))  # type: ignore[arg-type]  (see the docstring)
        return out

    def _greedy_produces(self, inputs: dict[str, Any], visual: Any, ids: list[int]) -> bool:
        """Whether greedy decoding of the prompt produces ``ids``: one teacher-forced forward over prompt +
        continuation, the argmax at each continuation position (the image placeholder never chosen, as the
        engine decodes) equal to the next token."""
        prompt = inputs["input_ids"]  # (1, L)
        cont = torch.tensor([ids], dtype=prompt.dtype, device=prompt.device)  # (1, T)
        full = torch.cat([prompt, cont], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(cont)], dim=1)
        logits = self.model(full, mask, visual=visual).logits[0, prompt.shape[1] - 1: -1].float()  # (T, V)
        logits[:, self.model.base.image_token_id] = float("-inf")
        return logits.argmax(-1).tolist() == ids

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("crosslayer: multi-round generation is not supported; use single-turn tasks")

"""The model deployment: ``VLMModel`` loads one base and every adapter over it and serves them through one
continuously batching engine (``pipelines.serve_engine``, driven by ``pipelines.serve_scheduler``).

Per replica, three threads of work: the Serve event loop (``generate``: one async generator per request), one
prepare thread (chat template, tokeniser, image encoding: never the decoder; requests that arrive together are
prepared in one batch) and one engine thread (prefill and decode steps). Tokenising a long prompt or encoding a large image therefore never delays the decode steps of
the requests already running. A request whose client goes away is cancelled: Serve cancels ``generate``, whose
``finally`` frees its rows before the next step.

Torch is imported inside the deployment only, so the driver and the ingress replicas stay light.
"""

import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from .serve_api import ApiError, ChatJob, End, Event, ServeConfig, Started

logger = logging.getLogger("ray.serve")


def load_models(cfg: ServeConfig) -> dict[str, Any]:
    """Load the base once and every adapter over it: model id -> FusedVLM (eval mode).

    Adapters share the base object: each FusedVLM's hooks on the decoder layers act only while that model
    runs. An adapter that ``includes_projector`` (projector_ft) overwrites the base's projector in place when
    loaded, so it gets a base copy of its own; so does nothing else."""
    import torch

    from cli_module.adapter import load_model
    from cli_module.loading import load_base

    dtype = getattr(torch, cfg.dtype)
    shared = load_base(cfg.base, dtype=dtype)
    models = {}
    for ident, path in cfg.model_specs():
        models[ident], _ = load_model(path, base=cfg.base, dtype=dtype, shared=shared)
        models[ident].to(dtype).eval()
    return models


@serve.deployment(name="VLMModel")
class VLMModel:
    """Holds the base and its adapters; decodes every request in one continuously batching engine."""

    def __init__(self, config: ServeConfig):
        import ray
        import torch
        from ray.util import metrics

        from .serve_engine import Engine
        from .serve_scheduler import Preparer, Scheduler

        self.cfg = config
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray exposes only the GPUs it assigned
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)  # deployments[] may override
        torch.set_num_threads(max(1, int(cpus)))
        models = {k: m.to(self.device) for k, m in load_models(config).items()}
        self.engine = Engine(models, max_rows=config.max_batch_size, max_prompt_tokens=config.max_prompt_tokens,
                             max_step_tokens=config.max_step_tokens, kv_cache_bytes=config.kv_cache_bytes)
        self.preparer = Preparer(self.engine, max_batch=config.max_batch_size)
        self.scheduler = Scheduler(self.engine, idle_wait_s=config.batch_wait_timeout_s, on_step=self._count)
        self.cancelled = 0  # requests whose client went away before their end
        self.counted: Counter[str] = Counter()  # generated tokens already added to the Ray metric
        self.generated_metric = metrics.Counter("crosslayer_generated_tokens_total", tag_keys=("model",),
                                                description="Tokens generated (EOS included), per served model.")

    def stats(self) -> dict[str, Any]:
        snap = self.engine.snapshot()
        return {"models": list(self.engine.models), "device": self.device, "max_batch_size": self.cfg.max_batch_size,
                "batch_sizes": {str(k): v for k, v in sorted(snap["batch_sizes"].items())},
                "generated_tokens": snap["generated"], "prompt_tokens": snap["prompt_tokens"],
                "running_rows": snap["running_rows"], "prefilling_requests": snap["prefilling_requests"],
                "kv_reserved_bytes": snap["kv_reserved_bytes"], "kv_total_bytes": snap["kv_total_bytes"],
                "queued_requests": self.scheduler.queued,
                "cancelled_requests": self.cancelled, "cancelled_rows": snap["cancelled_rows"]}

    def _count(self) -> None:
        for model, total in self.engine.snapshot()["generated"].items():
            if total > self.counted[model]:
                self.generated_metric.inc(total - self.counted[model], tags={"model": model})
                self.counted[model] = total

    async def generate(self, job: ChatJob) -> AsyncIterator[list[Event]]:
        """The request's events, in batches (whatever arrived since the last yield): ``Started``, ``Delta``s, and
        one ``End`` last (also alone, when the request cannot be prepared)."""
        request_id = uuid.uuid4().hex
        try:
            item = await self.preparer.prepare(job, request_id)
        except ApiError as err:
            yield [End(error=err)]
            return
        except (ValueError, KeyError) as err:
            yield [End(error=ApiError(400, f"could not prepare the request: {err}", code="invalid_request"))]
            return
        except Exception as err:  # noqa: BLE001 (never let one request take the replica down)
            logger.exception("crosslayer: preparing a request failed")
            yield [End(error=ApiError.internal(err, during="preparing the request"))]
            return
        queue = self.scheduler.submit(item)
        ended = False
        try:
            yield [Started(prompt_tokens=item.prompt_tokens)]
            while not ended:
                events = [await queue.get()]
                while not queue.empty():
                    events.append(queue.get_nowait())
                ended = isinstance(events[-1], End)
                yield events
        finally:
            if not ended:  # the client went away (Serve cancelled or closed this generator)
                self.cancelled += 1
                self.scheduler.cancel(request_id)

"""Where a batch job's model actors run: the device, the dtype, what each actor asks Ray for, how many there are.

`crosslayer features`, `caption` and `eval` map batches through a Ray Data actor pool (each actor loads its
model once). ``ComputeSpec`` is what the user asks for (``--device``, ``--dtype``, ``--concurrency``,
``--gpus-per-actor``, ``--batch-size``; ``auto`` / 0 everywhere by default); ``resolve_compute`` turns it and the
cluster's resources into a ``Compute``:

- device ``auto``: ``cuda`` when the Ray cluster has GPUs, else ``cpu``. ``cuda`` on a cluster with no GPU yet is
  accepted (an autoscaler adds GPU nodes when the actors ask for them) and said in ``Compute.notes``.
- dtype ``auto``: bfloat16 on cuda, float32 on cpu; bfloat16 works on CPU too when asked; float16 only on cuda.
- on cuda each actor asks for ``gpus_per_actor`` GPUs (1 by default; 0.5 puts two on a GPU) and the pool holds one
  actor per share of the cluster's GPUs (at least 1); on cpu it asks for no GPU and the pool holds one actor.
- batch size 0: the job's default for the device (GPU batches are larger, to fill the GPU).

``Compute.map_kwargs()`` is exactly what ``Dataset.map_batches`` receives for the model stage.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

Device = Literal["auto", "cpu", "cuda"]
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ComputeSpec:
    """What a job asks for; ``auto`` / 0 values are decided by ``resolve_compute``."""

    device: Device = "auto"  # auto: cuda when the Ray cluster has GPUs, else cpu
    dtype: ComputeDtype = "auto"  # model weights and activations; auto: bfloat16 on cuda, float32 on cpu
    concurrency: int = 0  # model actors; 0: one per gpus_per_actor GPUs on cuda, 1 on cpu
    gpus_per_actor: float = 1.0  # GPUs Ray reserves per actor on cuda (fractions share a GPU)
    cpus_per_actor: float = 1.0  # CPUs Ray reserves per actor
    batch_size: int = 0  # items per model call; 0: the job's default for the device

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r} is not one of {list(DEVICES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {list(DTYPES)}")
        if self.concurrency < 0 or self.batch_size < 0:
            raise ValueError(f"concurrency ({self.concurrency}) and batch_size ({self.batch_size}) must be >= 0 "
                             f"(0: automatic)")
        if not 0 < self.gpus_per_actor <= 8 or self.cpus_per_actor <= 0:
            raise ValueError(f"gpus_per_actor ({self.gpus_per_actor}) must be in (0, 8] and cpus_per_actor "
                             f"({self.cpus_per_actor}) > 0")
        if self.device == "cpu" and self.dtype == "float16":
            raise ValueError("dtype float16 is not supported on cpu (half-precision CPU kernels are missing or "
                             "slow); use bfloat16 or float32")


@dataclass
class Compute:
    """The resolved settings of a job's model actors."""

    device: Literal["cpu", "cuda"]  # where each actor puts its model
    dtype: Literal["float32", "bfloat16", "float16"]  # the model's dtype
    concurrency: int  # actors in the pool
    num_gpus: float  # GPUs Ray reserves per actor (0 on cpu)
    num_cpus: float  # CPUs Ray reserves per actor
    batch_size: int  # items per model call
    cluster_gpus: float = 0.0  # GPUs the cluster had when the job started
    notes: str = ""  # what was decided and why, for the job's summary

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def map_kwargs(self) -> dict[str, Any]:
        """The arguments of the model stage's ``map_batches``: actor pool size, per-actor resources, batch size."""
        import ray

        return {"compute": ray.data.ActorPoolStrategy(size=self.concurrency), "num_gpus": self.num_gpus,
                "num_cpus": self.num_cpus, "batch_size": self.batch_size}

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def resolve_compute(spec: ComputeSpec, cluster: dict[str, float], batch_cpu: int, batch_gpu: int) -> Compute:
    """``spec`` on a cluster with ``cluster`` resources (``ray.cluster_resources()``); ``batch_cpu`` /
    ``batch_gpu``: the job's default batch sizes."""
    gpus = float(cluster.get("GPU", 0.0))
    device = spec.device if spec.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    dtype = spec.dtype if spec.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    if device == "cpu" and dtype == "float16":
        raise ValueError("dtype float16 is not supported on cpu; use bfloat16 or float32")
    notes = []
    if device == "cuda":
        fit = math.floor(gpus / spec.gpus_per_actor + 1e-9)
        concurrency = spec.concurrency or max(1, fit)
        if gpus == 0:
            notes.append("the cluster has no GPU now: the actors wait for GPU nodes (an autoscaler adds them)")
        elif concurrency > fit:
            notes.append(f"{concurrency} actors x {spec.gpus_per_actor} GPU exceed the cluster's {gpus:g} GPUs: "
                         f"{fit} run at a time until more GPUs join")
        num_gpus = spec.gpus_per_actor
    else:
        concurrency, num_gpus = spec.concurrency or 1, 0.0
    batch = spec.batch_size or (batch_gpu if device == "cuda" else batch_cpu)
    return Compute(device=device, dtype=dtype, concurrency=concurrency, num_gpus=num_gpus,
                   num_cpus=spec.cpus_per_actor, batch_size=batch, cluster_gpus=gpus, notes="; ".join(notes))


def cluster_resources() -> dict[str, float]:
    """The running Ray cluster's total resources (starts a local Ray if none is running)."""
    import ray

    if not ray.is_initialized():
        ray.init(configure_logging=False)
    return dict(ray.cluster_resources())


def place_model(model: Any, compute: Compute) -> Any:
    """Move a loaded model (an ``nn.Module``) to the actor's device and dtype; on cuda, Ray has already limited
    the actor to its own GPU(s) (``CUDA_VISIBLE_DEVICES``), so ``cuda`` is the first of them."""
    import torch

    if compute.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("this actor was scheduled for cuda but sees no CUDA device: check the node's driver "
                           "and that the job asks Ray for GPUs (num_gpus)")
    return model.to(device=compute.device, dtype=compute.torch_dtype())


def add_compute_arguments(p: Any, batch_cpu: int, batch_gpu: int, dtype_flag: str = "--dtype") -> None:
    """The command-line flags of a ComputeSpec (``dtype_flag`` names the model-dtype flag: the feature cache's
    ``--dtype`` is its storage dtype, so ``features`` uses ``--compute-dtype``)."""
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where the model actors run (auto: cuda when the Ray cluster has GPUs, else cpu)")
    p.add_argument(dtype_flag, dest="compute_dtype", choices=DTYPES, default="auto",
                   help="model dtype (auto: bfloat16 on cuda, float32 on cpu; bfloat16 also works on cpu)")
    p.add_argument("--concurrency", type=int, default=0,
                   help="model actors (0: one per --gpus-per-actor GPUs of the cluster on cuda, 1 on cpu)")
    p.add_argument("--gpus-per-actor", type=float, default=1.0, help="GPUs Ray reserves per model actor on cuda")
    p.add_argument("--batch-size", type=int, default=0,
                   help=f"items per model call (0: {batch_cpu} on cpu, {batch_gpu} on cuda)")

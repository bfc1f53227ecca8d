"""The feature cache's format, in one place: its key (``cache.json``), the tensor column codecs, the check that a
cache serves a model, and reading it (a Ray Dataset, one Arrow table, or an in-memory lookup by image id).

Layout: ``DEST/part-*.parquet`` shards + ``DEST/errors.parquet`` + ``DEST/cache.json`` (the key, row and error
counts). Rows: ``image_id`` (sha256 of the bytes), ``source``, ``select`` (N, Dv: the base's select layer, which
feeds the LLM's input) and ``layers`` (K, N', Dv: the vision layers K, pooled) as Arrow fixed-shape tensors in
float16 / bfloat16 (stored as its uint16 bits) / int8 (+ ``*_scale`` per token). ``pipelines.features`` writes
caches; features, training, evaluation and captioning read them through this module.

A Qwen base's images have a token count each (dynamic resolution), so its rows have their own shapes: ``tokens``
(N_i, int32), ``image_grid_thw`` ((3,) int32 fixed-shape tensor: t, h, w in patches; N_i = t * h * w / merge^2)
and the tensor columns as Arrow large lists holding each row's values flattened in row-major order: ``select``
(N_i, Dv'), ``layers`` (K, N_i, Dv'), ``*_scale`` (.., N_i) for int8, and for Qwen3-VL ``deepstack`` (J, N_i, Dv'):
the ViT blocks its own DeepStack reads (the key's ``deepstack``), which every method but ``one_to_one`` needs.
Dv' = merge^2 * Dv (a merge unit). Readers pad a batch's rows to the longest and pass the grids on.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cli_module.config import resolve_vision_layers

from . import storage

Dtype = Literal["float16", "bfloat16", "int8"]
CACHE_FILE = "cache.json"
ERRORS_FILE = "errors.parquet"


@dataclass
class CacheKey:
    """Everything the cached numbers depend on; a reader refuses a cache whose key differs."""

    base: str  # base preset, hub id, folder or s3:// prefix
    revision: str | None  # base revision or seed
    image_processor: dict[str, Any]  # the processor's settings (size, crop, mean, std, ...)
    select_layer: int  # the base's input layer (stored unpooled as `select`)
    layers: list[int]  # the vision layers K stored in the `layers` column, non-negative (file field name)
    pool: int  # pooling applied to `layers`
    dtype: Dtype  # storage dtype
    deepstack: list[int] = field(default_factory=list)  # Qwen3-VL: the ViT blocks (0-based) its own DeepStack
    #                                                     reads, stored in the `deepstack` column; [] = none

    def to_json(self) -> dict[str, Any]:
        """cache.json's ``key``; an empty ``deepstack`` is left out (caches without it keep their format)."""
        out = asdict(self)
        if not out["deepstack"]:
            del out["deepstack"]
        return out

    def diff(self, other: CacheKey) -> list[str]:
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: cache has {mine[k]!r}, expected {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


def image_processor_settings(proc: Any) -> dict[str, Any]:
    keep = ("size", "crop_size", "do_center_crop", "do_resize", "do_normalize", "image_mean", "image_std",
            "resample", "do_convert_rgb", "image_grid_pinpoints")
    out = {}
    for k in keep:
        v = getattr(proc, k, None)
        if v is not None:
            v = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
            v = {a: b for a, b in dict(v).items() if b is not None} if isinstance(v, dict) else v
            out[k] = json.loads(json.dumps(v, default=lambda o: getattr(o, "value", str(o))))
    out["class"] = type(proc).__name__.removesuffix("Pil")
    return out


def cache_key_for(base: Any, vision_layers: list[int], pool: int, dtype: Dtype,
                  max_pixels: int | None = None) -> CacheKey:
    """The key of a cache of ``vision_layers`` (hidden_states indices, negative from the end) for ``base``;
    ``max_pixels`` bounds a Qwen processor's pixels (``pipelines.pixels.bounded``), hence its token counts."""
    from .pixels import bounded

    depth = base.num_vision_layers
    name, revision = base.encoder_identity  # a derived base shares its source's encoder, hence its caches
    deepstack = list(base.vision_config.deepstack_visual_indexes) if base.kind == "qwen3_vl" else []
    return CacheKey(base=name, revision=revision,
                    image_processor=image_processor_settings(bounded(base.image_processor, max_pixels)),
                    select_layer=resolve_vision_layers([base.select_layer], depth)[0],
                    layers=resolve_vision_layers(vision_layers, depth), pool=pool, dtype=dtype, deepstack=deepstack)


# --- tensor columns ------------------------------------------------------------------------------

def encode_column(name: str, x: Any, dtype: Dtype) -> dict[str, pa.Array]:
    """A float tensor (B, ...) -> Arrow fixed-shape tensor column(s) in the storage dtype."""
    import torch

    x = x.float().contiguous()  # a strided (e.g. transposed) tensor would be stored with a permuted shape
    if dtype == "float16":
        return {name: pa.FixedShapeTensorArray.from_numpy_ndarray(x.half().numpy())}
    if dtype == "bfloat16":
        return {name: pa.FixedShapeTensorArray.from_numpy_ndarray(x.bfloat16().view(torch.int16).numpy().view(np.uint16))}
    scale = x.abs().amax(dim=-1).clamp(min=1e-8) / 127.0  # per token
    q = torch.round(x / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return {name: pa.FixedShapeTensorArray.from_numpy_ndarray(q.numpy()),
            f"{name}_scale": pa.FixedShapeTensorArray.from_numpy_ndarray(scale.numpy().astype(np.float32))}


def encode_rows(name: str, rows: list[Any], dtype: Dtype) -> dict[str, pa.Array]:
    """Tensors of their own shapes, one per row (..., N_i, D) -> Arrow large-list column(s) of each row's values,
    flattened row-major, in the storage dtype (int8: ``*_scale`` per token, (..., N_i) flattened)."""
    out: dict[str, list[np.ndarray]] = {}
    for x in rows:
        for column, values in encode_column(name, x[None], dtype).items():
            out.setdefault(column, []).append(values.to_numpy_ndarray().reshape(-1))
    return {column: pa.array(values, type=pa.large_list(pa.from_numpy_dtype(values[0].dtype)))
            for column, values in out.items()}


def decode_column(batch: dict[str, np.ndarray], name: str, dtype: Dtype) -> Any:
    """Inverse of ``encode_column`` on a numpy batch -> float32 torch tensor (B, ...); rows of their own shapes
    (``encode_rows``, a batch with ``tokens``) are zero-padded to the longest: (B, ..., max N_i, D)."""
    import torch

    if batch[name].dtype == object:
        return _decode_rows(batch, name, dtype)
    x = np.ascontiguousarray(batch[name])
    if dtype == "float16":
        return torch.from_numpy(x.astype(np.float32))
    if dtype == "bfloat16":
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(x.astype(np.float32)) * torch.from_numpy(np.ascontiguousarray(batch[f"{name}_scale"])).unsqueeze(-1)


def _decode_rows(batch: dict[str, np.ndarray], name: str, dtype: Dtype) -> Any:
    import torch
    from torch.nn import functional as F

    rows = []
    for i, flat in enumerate(batch[name]):
        n = int(batch["tokens"][i])
        d = np.asarray(batch["select"][i]).size // n  # every tensor column of a row has select's token width
        one = {name: np.array(flat).reshape(1, -1, n, d)}  # a writable copy (Arrow's buffers are read-only)
        if dtype == "int8":
            one[f"{name}_scale"] = np.array(batch[f"{name}_scale"][i]).reshape(1, -1, n)
        rows.append(decode_column(one, name, dtype)[0])  # (J, N_i, D)
    width = max(r.shape[-2] for r in rows)
    out = torch.stack([F.pad(r, (0, 0, 0, width - r.shape[-2])) for r in rows])  # (B, J, max N_i, D)
    return out[:, 0] if name == "select" else out


# --- reading -------------------------------------------------------------------------------------------

def shard_uris(cache: str) -> list[str]:
    try:
        return [u for u in storage.list_files(cache) if u.rsplit("/", 1)[-1].startswith("part-")]
    except storage.SourceError:
        return []


def cached_ids(cache: str) -> set[str]:
    ids: set[str] = set()
    for uri in shard_uris(cache):
        ids.update(pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["image_id"])["image_id"].to_pylist())
    return ids


def per_image_shapes(cache: str) -> bool:
    """Whether the cache's rows have their own token counts (a Qwen base's), from its first shard's schema."""
    shards = shard_uris(cache)
    if not shards:
        return False
    fs, path = storage.resolve(shards[0])
    return "tokens" in pq.ParquetFile(fs.open_input_file(path)).schema_arrow.names


def read_cache_info(cache: str, expect: CacheKey | None = None) -> dict[str, Any]:
    """cache.json of a cache; with ``expect``, refuse a cache made differently, naming each field."""
    uri = storage.join(cache, CACHE_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{cache}: no {CACHE_FILE}; build it with `crosslayer features SRC --out {cache}`")
    info = storage.read_json(uri)
    if expect is not None:
        diff = CacheKey(**info["key"]).diff(expect)
        if diff:
            raise ValueError(f"feature cache {cache} does not match this model: {'; '.join(diff)}; "
                             f"rebuild it with matching --base/--layers/--pool")
    return info


def check_serves(cache: str, base: Any, vision_layers: list[int], pool: int,
                 deepstack: bool = False) -> tuple[dict[str, Any], list[int]]:
    """Check that a cache can feed a model whose plug-in reads hidden_states ``vision_layers`` pooled by ``pool``:
    same base, revision, image processor and select layer; its layers include those (same pooling when any are
    needed); with ``deepstack`` (a Qwen3-VL model that keeps its own DeepStack on), the blocks DeepStack reads.
    A Qwen cache's pixel bound (``--max-pixels``) is the cache's own choice: any token count feeds the model.
    Returns cache.json and the positions of ``vision_layers`` in the cache's ``layers`` column."""
    from .pixels import max_pixels_of

    info = read_cache_info(cache)
    have = CacheKey(**info["key"])
    bound = have.image_processor.get("size", {}).get("longest_edge") if max_pixels_of(base.image_processor) else None
    want = cache_key_for(base, vision_layers, pool if vision_layers else have.pool, have.dtype, max_pixels=bound)
    problems = [d for d in have.diff(want) if not d.startswith(("layers:", "pool:", "deepstack:"))]
    if deepstack and have.deepstack != want.deepstack:
        problems.append(f"deepstack: cache has blocks {have.deepstack}, this model keeps Qwen3-VL's own DeepStack "
                        f"on and needs blocks {want.deepstack} (method one_to_one turns it off)")
    missing = [k for k in want.layers if k not in have.layers]
    if missing:
        problems.append(f"layers: cache has {have.layers}, the model needs {want.layers} (missing {missing})")
    if vision_layers and have.pool != want.pool:
        problems.append(f"pool: cache has {have.pool}, the model needs {want.pool}")
    if problems:
        raise ValueError(f"feature cache {cache} does not match this model: {'; '.join(problems)}; rebuild it with "
                         f"`crosslayer features SRC --out DIR --base {base.name} --layers "
                         f"{' '.join(map(str, want.layers or have.layers))} --pool {want.pool}`")
    return info, [have.layers.index(k) for k in want.layers]


class CacheLookup:
    """A cache held in memory with its rows by image id, checked against the model it feeds (evaluation and
    captioning read caches that fit in RAM; training streams its own rows)."""

    def __init__(self, cache: str, base: Any, vision_layers: list[int], pool: int, deepstack: bool = False):
        info, self.index = check_serves(cache, base, vision_layers, pool, deepstack)
        self.dtype: Dtype = info["key"]["dtype"]
        self.columns = table_to_numpy(load_cache_table(cache))
        self.rows = {image_id: r for r, image_id in enumerate(self.columns["image_id"])}

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.rows

    def features(self, image_ids: list[str]):
        """VisionFeatures of these images, in this order (KeyError for an image the cache lacks)."""
        rows = [self.rows[i] for i in image_ids]
        sub = {k: v[rows] for k, v in self.columns.items() if k not in ("image_id", "source")}
        return batch_to_features(sub, self.dtype, self.index)


def read_cache(cache: str, expect: CacheKey | None = None):
    """The cache as a Ray Dataset (image_id, source, select, layers[, scales])."""
    import ray

    read_cache_info(cache, expect)
    return ray.data.read_parquet(shard_uris(cache))


def load_cache_table(cache: str, expect: CacheKey | None = None) -> pa.Table:
    """The whole cache as one Arrow table, without Ray (small caches, evaluation, tests)."""
    read_cache_info(cache, expect)
    return pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(u))) for u in shard_uris(cache)])


def table_to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    """Arrow table -> numpy batch, tensor columns as (rows, *shape) arrays (what Ray Data's numpy batches hold)."""
    out = {}
    for name in table.column_names:
        col = table[name].combine_chunks()
        out[name] = col.to_numpy_ndarray() if isinstance(col.type, pa.FixedShapeTensorType) else col.to_numpy(zero_copy_only=False)
    return out


def batch_to_features(batch: dict[str, np.ndarray], dtype: Dtype, index: list[int] | None = None):
    """A numpy batch of cache rows -> VisionFeatures for the fused model's features path; ``index`` picks
    (and orders) the model's layers out of the cache's (from ``check_serves``; None keeps them all). Rows of a
    Qwen cache come padded to the longest, with their grids and (when read) the DeepStack blocks."""
    import torch

    from cli_module.model import VisionFeatures

    layers = None
    if (index is None or index) and "layers" in batch:
        layers = decode_column(batch, "layers", dtype)
        layers = layers if index is None else layers[:, index]
    grids = deepstack = None
    if "image_grid_thw" in batch:
        grids = torch.from_numpy(np.asarray(np.stack(list(batch["image_grid_thw"])), dtype=np.int64))  # (B, 3)
        deepstack = decode_column(batch, "deepstack", dtype) if "deepstack" in batch else None  # (B, J, N, D)
    return VisionFeatures(select_features=decode_column(batch, "select", dtype), layers=layers, grids=grids,
                          deepstack=deepstack)


# --- sizing ------------------------------------------------------------------------------------------------

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "int8": 1}


def estimate(base: Any, vision_layers: list[int], pool: int, dtype: Dtype, images: int,
             batch_size: int = 16) -> dict[str, Any]:
    """The size of a cache without running the encoder: the encoder runs on the meta device (shapes only) for one
    whole-image crop, as the cache stores it (a Qwen base: an image at its processor's max_pixels, the most). Bytes are the tensors' (int8 adds a float32 scale per token) plus
    ~100 bytes of id and path per image; Parquet's compression saves little on float features."""

    from cli_module.model import blank_crop, encode_images

    per = DTYPE_BYTES[dtype]
    if base.qwen:  # tokens vary per image: the bound, an image at the processor's max_pixels
        from .pixels import max_pixels_of

        unit = base.vision_config.patch_size * base.vision_config.spatial_merge_size
        n, d = max_pixels_of(base.image_processor) // unit**2, base.feature_dim
        shapes = {"select": (n, d), "layers": (len(vision_layers), n, d)}
        if base.kind == "qwen3_vl":
            shapes["deepstack"] = (len(base.vision_config.deepstack_visual_indexes), n, d)
    else:
        pixels = blank_crop(base)  # on the meta device for a base loaded with weights=False: no compute
        feats = encode_images(base, pixels, resolve_vision_layers(vision_layers, base.num_vision_layers), pool)
        shapes = {"select": tuple(feats.select_features.shape[1:])}
        if feats.layers is not None:
            shapes["layers"] = tuple(feats.layers.shape[1:])
    tensor_bytes = 0
    for shape in shapes.values():
        numel = int(np.prod(shape))
        tensor_bytes += numel * per + (4 * numel // shape[-1] if dtype == "int8" else 0)
    per_image = tensor_bytes + 100
    return {"base": base.name, "vision_layers": list(vision_layers), "pool": pool, "dtype": dtype,
            "shapes": {k: list(v) for k, v in shapes.items()}, "tensor_bytes_per_image": tensor_bytes,
            "bytes_per_image": per_image, "images": images, "total_bytes": per_image * images,
            "shards": -(-images // batch_size)}

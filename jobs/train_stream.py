"""Training data, worker side: a rank's examples in memory, their features streamed per micro-batch.

A worker holds only its examples' tokens and feature locations (``RankExamples``: flat numpy arrays, read from the
run's examples file), never the features of its shard. Micro-batch ``m`` of the run is a pure function of (seed,
epoch, position, rank) (``MicroBatches``), so a resumed run sees exactly the data it would have, and the loader
knows the next micro-batch in advance: ``Loader`` reads its features in a background thread while the current
step runs. Features come from the cache's Parquet shards, one row group per read (``FeatureReader``; an image is
stored once however many examples use it; transient storage errors are retried, a missing or truncated shard
fails naming it), or, without a cache, from the frozen encoder on the worker's device (``ImageFeatures``) over
images that Ray Data tasks decode and preprocess on CPUs, in the run's order from the resume point
(``PixelStream``).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.feature_cache import batch_to_features

from .train_data import SPLITS, CacheView, rank_of

READ_ATTEMPTS = 4  # tries of one shard read before the run fails (transient storage errors)
OPEN_FILES = 32  # shard handles a reader keeps open


@dataclass
class Batch:
    input_ids: Any  # (B, S) int64, right-padded
    attention_mask: Any  # (B, S) int64
    labels: Any  # (B, S) int64, -100 on prompt and padding
    features: Any  # VisionFeatures of the rows with an image (``rows`` marks them in a mixed batch), or None
    tokens: int  # real (non-pad) tokens in the batch

    def to(self, device: Any) -> Batch:
        """The batch on ``device`` (the engine's: CPU, or the worker's GPU with trainer.use_gpu)."""
        from cli_module.model import VisionFeatures

        f, features = self.features, None
        if f is not None:
            def on(x: Any) -> Any:
                return x.to(device) if x is not None else None

            features = VisionFeatures(select_features=f.select_features.to(device), layers=on(f.layers),
                                      rows=on(f.rows), grids=on(f.grids), deepstack=on(f.deepstack))
        return Batch(input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                     labels=self.labels.to(device), features=features, tokens=self.tokens)


class RankExamples:
    """One split of one rank: tokens as flat int32 arrays with offsets, feature locations, sorted by ``idx``."""

    def __init__(self, idx: np.ndarray, offsets: np.ndarray, ids: np.ndarray, labels: np.ndarray,
                 location: np.ndarray, sources: list[str | None]):
        self.idx = idx  # (n,) example index in its split
        self.offsets = offsets  # (n + 1,) token offsets into ids / labels
        self.ids, self.labels = ids, labels  # (total tokens,) int32
        self.location = location  # (n, 3) int32: shard, row group, row; -1 rows have no cached image
        self.sources = sources  # image path per example (encode on the fly), None for text-only rows

    def __len__(self) -> int:
        return len(self.idx)

    def has_image(self, rows: np.ndarray) -> np.ndarray:
        return np.array([self.sources[i] is not None or self.location[i, 0] >= 0 for i in rows], dtype=bool)

    @classmethod
    def read(cls, uri: str, rank: int, world: int, seed: int, sizes: dict[str, int]) -> dict[str, RankExamples]:
        """This rank's train and eval examples out of the run's examples file, batch by batch (only the rank's
        rows are kept: memory grows with the rank's tokens, never with the features)."""
        owner_train = np.asarray(rank_of(sizes["train"], world, seed), dtype=np.int64)
        parts: dict[str, list[pa.Table]] = defaultdict(list)
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=8192):
                split, idx = batch["split"].to_numpy(), batch["idx"].to_numpy()
                owner = np.where(split == SPLITS["train"], owner_train[np.minimum(idx, max(len(owner_train) - 1, 0))],
                                 idx % world)
                for name, code in SPLITS.items():
                    keep = np.flatnonzero((owner == rank) & (split == code))
                    if len(keep):
                        parts[name].append(pa.Table.from_batches([batch]).take(pa.array(keep)))
        return {name: cls._from_tables(parts[name]) for name in SPLITS}

    @classmethod
    def from_examples(cls, examples: list[Any]) -> RankExamples:
        """From the driver's ``Example`` list (one process, no file: evaluation of a run, benchmarks)."""
        from .train_data import examples_table

        return cls._from_tables([examples_table({"train": examples})] if examples else [])

    @classmethod
    def _from_tables(cls, tables: list[pa.Table]) -> RankExamples:
        if not tables:
            empty = np.zeros(0, dtype=np.int32)
            return cls(np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64), empty, empty,
                       np.zeros((0, 3), dtype=np.int32), [])
        table = pa.concat_tables(tables).sort_by("idx")
        ids = table["input_ids"].combine_chunks()
        lengths = np.diff(ids.offsets.to_numpy())
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        location = np.stack([table[c].to_numpy() for c in ("shard", "row_group", "row")], axis=1).astype(np.int32)
        return cls(table["idx"].to_numpy(), offsets, ids.flatten().to_numpy().astype(np.int32),
                   table["labels"].combine_chunks().flatten().to_numpy().astype(np.int32), location,
                   table["source"].to_pylist())

    def tokens(self, rows: np.ndarray, pad_id: int) -> tuple[Any, Any, Any]:
        """(input_ids, attention_mask, labels), each (B, S) int64, right-padded (positions come from the mask)."""
        import torch

        spans = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in rows]
        length = max(b - a for a, b in spans)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for j, (a, b) in enumerate(spans):
            ids[j, :b - a] = torch.from_numpy(self.ids[a:b].astype(np.int64))
            labels[j, :b - a] = torch.from_numpy(self.labels[a:b].astype(np.int64))
            mask[j, :b - a] = 1
        return ids, mask, labels


class FeatureReader:
    """Reads cached features by location, one row group per (shard, row group) a micro-batch needs."""

    def __init__(self, view: CacheView):
        self.view = view
        self.files: OrderedDict[int, pq.ParquetFile] = OrderedDict()  # shard -> open file (LRU)

    def _file(self, shard: int) -> pq.ParquetFile:
        if shard in self.files:
            self.files.move_to_end(shard)
            return self.files[shard]
        fs, path = storage.resolve(self.view.shards[shard])
        handle = pq.ParquetFile(fs.open_input_file(path))
        self.files[shard] = handle
        if len(self.files) > OPEN_FILES:
            self.files.popitem(last=False)
        return handle

    def _read_group(self, shard: int, group: int) -> pa.Table:
        uri = self.view.shards[shard]
        for attempt in range(READ_ATTEMPTS):
            try:
                return self._file(shard).read_row_group(group, columns=self.view.columns)
            except FileNotFoundError as err:
                raise RuntimeError(f"feature cache shard {uri} is missing ({err}); the cache changed under the "
                                   f"run: rebuild it with `crosslayer features` and start a new run") from err
            except (OSError, pa.ArrowInvalid) as err:
                self.files.pop(shard, None)
                if isinstance(err, pa.ArrowInvalid) or attempt == READ_ATTEMPTS - 1:
                    raise RuntimeError(f"feature cache shard {uri} cannot be read ({type(err).__name__}: {err}); "
                                       f"it is missing, truncated or unreachable: rebuild the cache with "
                                       f"`crosslayer features`") from err
                time.sleep(0.2 * 2 ** attempt)  # transient storage error: back off and retry
        raise AssertionError("unreachable")

    def read(self, locations: np.ndarray) -> dict[str, np.ndarray]:
        """Feature columns (stored dtype) of the images at ``locations`` (n, 3), in that order."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for j, (shard, group, _) in enumerate(locations):
            groups[(int(shard), int(group))].append(j)
        out: dict[str, np.ndarray] = {}
        for (shard, group), js in groups.items():
            table = self._read_group(shard, group)
            rows = table.take(pa.array([int(locations[j, 2]) for j in js]))
            for column in self.view.columns:
                values = _tensor_numpy(rows[column])
                if column not in out:
                    out[column] = np.empty((len(locations), *values.shape[1:]), dtype=values.dtype)
                out[column][js] = values
        return out

    def features(self, locations: np.ndarray) -> Any:
        """VisionFeatures (float32 torch) of the images at ``locations``."""
        picked = self.read(locations)
        index = self.view.layer_index if self.view.layer_index is not None else []
        return batch_to_features(picked, self.view.dtype, index)  # (B, N, Dv), (B, K, N', Dv); a Qwen cache's
        #                                                           rows padded to the longest, with their grids


def decode_pixels(sources: list[str], processor: Any) -> dict[str, np.ndarray]:
    """Read and preprocess images with the base's processor -> ``pipelines.pixels``' rows: (B, C, H, W) whole-image
    crops, or a Qwen base's patches per image with ``image_grid_thw`` (B, 3); an unreadable image ends the run
    naming it (no cache records it as the feature cache would)."""
    from pipelines.images import decode_image
    from pipelines.pixels import preprocess

    images = []
    for src in sources:
        try:
            images.append(decode_image(storage.read_bytes(src)))  # the default pixel cap, as every job
        except Exception as err:  # noqa: BLE001 (any unreadable image ends the run, naming it)
            raise RuntimeError(f"image {src} cannot be read ({type(err).__name__}: {err}); fix or drop its row, or "
                               f"train from a feature cache (which records and skips bad images)") from err
    return preprocess(processor, images)


def _decode_rows(batch: dict[str, np.ndarray], processor: Any) -> dict[str, np.ndarray]:
    """Ray Data map: a batch of ``source`` rows -> the same rows with their ``pixels`` and ``image_grid_thw``."""
    return {"source": batch["source"], **decode_pixels([str(x) for x in batch["source"]], processor)}


class PixelStream:
    """Encode on the fly, training split: Ray Data tasks (on any node's CPUs) read and preprocess the images of this
    rank's micro-batches ``start`` .. ``stop`` - 1 in the order the run takes them (order preserved); ``take`` hands
    them over micro-batch by micro-batch, checking that each is the image the batch expects."""

    def __init__(self, examples: RankExamples, micro: MicroBatches, start: int, stop: int, processor: Any,
                 batch_size: int = 16):
        import ray
        from ray.data import DataContext

        items = [{"source": examples.sources[i]} for m in range(start, stop) for i in micro.rows(m)[1]
                 if examples.sources[i] is not None]
        self.rows: Any = iter(())
        if items:
            ctx = DataContext.get_current()
            ctx.execution_options.preserve_order = True  # the run's order, not completion order
            ctx.enable_progress_bars = False
            ds = ray.data.from_items(items).map_batches(_decode_rows, batch_size=batch_size, batch_format="numpy",
                                                        num_cpus=0.5, fn_kwargs={"processor": processor})
            self.rows = iter(ds.iter_rows())

    def take(self, sources: list[str]) -> dict[str, np.ndarray]:
        pixels, grids = np.empty(len(sources), dtype=object), []
        for j, src in enumerate(sources):
            row = next(self.rows, None)
            if row is None or str(row["source"]) != src:
                raise RuntimeError(f"decoded image stream out of step: expected {src}, got "
                                   f"{None if row is None else row['source']}")
            pixels[j] = row["pixels"]
            grids.append(row["image_grid_thw"])
        return {"pixels": pixels, "image_grid_thw": np.stack(grids)}


class ImageFeatures:
    """No cache: the frozen encoder on decoded images (``encode``, on the model's device); ``pixels`` decodes in
    this process (evaluation batches; training takes its pixels from a ``PixelStream``)."""

    def __init__(self, model: Any):
        self.model = model

    def pixels(self, sources: list[str]) -> dict[str, np.ndarray]:
        return decode_pixels(sources, self.model.base.image_processor)

    def encode(self, decoded: dict[str, np.ndarray]) -> Any:
        from pipelines.pixels import model_inputs

        pixels, grids = model_inputs(decoded["pixels"], decoded["image_grid_thw"])  # crops, or Qwen's patches + grids
        return self.model.encode_images(pixels, image_grid_thw=grids)


def _tensor_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-shape tensor column (Arrow's canonical type or Ray's own) -> numpy (n, ...)."""
    array = column.combine_chunks()
    if isinstance(array, pa.FixedShapeTensorArray):
        return array.to_numpy_ndarray()
    return np.asarray(array.to_numpy(zero_copy_only=False))


class Loader:
    """Batches of one split: tokens from memory, features streamed; ``prefetch(rows)`` starts reading the
    features of a coming batch in a background thread, ``batch(rows)`` takes them (or reads them now)."""

    def __init__(self, examples: RankExamples, pad_id: int, reader: FeatureReader | None = None,
                 images: ImageFeatures | None = None, stream: PixelStream | None = None):
        self.examples, self.pad_id, self.reader, self.images = examples, pad_id, reader, images
        self.stream = stream  # on the fly: pixels decoded by Ray Data in the run's order (else decoded here)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crosslayer-prefetch")
        self.pending: dict[bytes, Future] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def _load(self, rows: np.ndarray) -> Any:
        """The background part: cached features (decoded), or decoded pixels (the encoder runs in ``batch``)."""
        with_image = self.examples.has_image(rows)
        if not with_image.any():
            return None
        picked = rows[with_image]
        if self.reader is not None:
            return self.reader.features(self.examples.location[picked])
        sources = [self.examples.sources[i] for i in picked]
        return self.stream.take(sources) if self.stream is not None else self.images.pixels(sources)

    def prefetch(self, rows: np.ndarray) -> None:
        key = np.asarray(rows, dtype=np.int64).tobytes()
        if key not in self.pending:
            self.pending[key] = self.pool.submit(self._load, np.asarray(rows, dtype=np.int64))

    def batch(self, rows: np.ndarray) -> Batch:
        import torch

        rows = np.asarray(rows, dtype=np.int64)
        for stale in [k for k in self.pending if k != rows.tobytes()]:  # prefetches that will not be taken
            self.pending.pop(stale).cancel()
        future = self.pending.pop(rows.tobytes(), None) or self.pool.submit(self._load, rows)
        loaded = future.result()  # every read runs on the one loader thread, in order
        ids, mask, labels = self.examples.tokens(rows, self.pad_id)
        with_image = self.examples.has_image(rows)
        features = loaded
        if loaded is not None and self.reader is None:
            features = self.images.encode(loaded)
        if features is not None and not with_image.all():
            features.rows = torch.from_numpy(with_image)
        return Batch(input_ids=ids, attention_mask=mask, labels=labels, features=features, tokens=int(mask.sum()))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def local_loader(prepared: Any, split: str, pad_id: int, model: Any = None) -> Loader:
    """A whole split as one rank, without Ray: what a single process trains or evaluates on (tests, benchmarks).
    Without a feature cache, ``model`` encodes the images."""
    view = prepared.cache
    return Loader(RankExamples.from_examples(getattr(prepared, split)), pad_id,
                  FeatureReader(view) if view.uri else None, None if view.uri else ImageFeatures(model))


# --- the order --------------------------------------------------------------------------------------------

def order_seed(seed: int, epoch: int, rank: int) -> int:
    digest = hashlib.sha256(f"crosslayer-train/{seed}/{epoch}/{rank}".encode()).hexdigest()
    return int(digest[:15], 16)


class MicroBatches:
    """Micro-batch m of a rank = rows of its shard at positions [p*B, (p+1)*B) of epoch e's order, with
    (e, p) = divmod(m, per_epoch) and the order a torch.randperm seeded by (seed, e, rank)."""

    def __init__(self, size: int, micro_batch: int, per_epoch: int, seed: int, rank: int):
        self.size, self.micro_batch, self.per_epoch, self.seed, self.rank = size, micro_batch, per_epoch, seed, rank
        self._orders: dict[int, np.ndarray] = {}

    def rows(self, m: int) -> tuple[int, np.ndarray]:
        """-> (epoch, shard positions of micro-batch m)."""
        import torch

        epoch, pos = divmod(m, self.per_epoch)
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(order_seed(self.seed, epoch, self.rank))
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}  # this epoch and the last
            self._orders[epoch] = torch.randperm(self.size, generator=gen).numpy()
        return epoch, self._orders[epoch][pos * self.micro_batch:(pos + 1) * self.micro_batch]

"""Training data for ``crosslayer train``: LLaVA conversations joined to a feature cache, checked before training.

Driver side (``prepare_data``, no encoder runs): check the cache's key against the model (base, revision, image
processor and select layer equal; the layers the method needs present; pooling equal when layers are needed),
read the JSONL records, resolve each one's image to a cache row (``image_id`` field, else the image path resolved
against the JSONL's folder, compared with the cache's ``source``), tokenise with answer-only labels, enforce
``data.max_length``, hold out the eval split and deal the examples to ranks by a seeded permutation. Bad rows
fail the run before it starts, or are skipped and counted with ``data.skip_bad_rows``. ``rank_datasets`` then
joins each rank's examples to their cached features: one Ray task per cache shard, one Ray dataset per rank
(materialised before the workers take the CPUs; each worker reads its own with ``get_dataset_shard``).

Worker side (``ShardData``): the rank's shard held in memory, sorted by example index; micro-batch ``m`` of the
run is a pure function of (seed, epoch, position, rank), so a resumed run sees exactly the data it would have.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cli_module.prompting import build_example
from pipelines import storage
from pipelines.feature_cache import check_serves, decode_column, shard_uris

SHOWN_PER_REASON = 3  # examples of each kind of bad row quoted in the error
SPLITS = {"train": 0, "eval": 1}  # value of the `split` column in the joined rows
CUT = "cut by data.max_length"  # the reason of rows dropped because max_length would cut their image or answers


@dataclass
class Example:
    idx: int  # position among the usable examples of its split: the stable sort key
    image_id: str | None  # cache row holding this example's features; None: a text-only example
    input_ids: list[int]  # (S,) prompt + answer, <image> expanded to the cache's token count
    labels: list[int]  # (S,) answer tokens, -100 elsewhere


@dataclass
class CacheView:
    """How a worker reads this model's features out of the cache (plain values: travels to the workers)."""

    uri: str  # cache folder or s3:// prefix
    shards: list[str]  # Parquet shard URIs
    dtype: str  # storage dtype: float16, bfloat16 or int8
    columns: list[str]  # feature columns to read (select[, layers][, *_scale])
    layer_index: list[int] | None  # positions of the model's feature layers in the cache's `layers`; None = unused
    image_tokens: int  # placeholder tokens per image: select's N (+1 for OneVision's image_newline)


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    cache: CacheView
    max_length: int  # the enforced sequence limit
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows skipped (skip_bad_rows)
    rows_read: dict[str, int] = field(default_factory=dict)  # split -> JSONL rows read
    truncated: int = 0  # examples cut to max_length (their answers past it are lost)
    text_only: int = 0  # examples without an image (trained as text)


# --- the cache against the model ---------------------------------------------------------------------

def check_cache(uri: str, base: Any, vision_layers: list[int], pool: int) -> CacheView:
    """Refuse a cache built for another base / encoder settings or lacking the layers the model reads."""
    info, layer_index = check_serves(uri, base, vision_layers, pool)
    dtype = info["key"]["dtype"]
    shards = shard_uris(uri)
    if not shards:
        raise ValueError(f"feature cache {uri} holds no shards; build it with `crosslayer features`")
    fs, path = storage.resolve(shards[0])
    schema = pq.ParquetFile(fs.open_input_file(path)).schema_arrow
    select_shape = list(schema.field("select").type.shape)  # (N, Dv)
    columns = ["select"] + (["select_scale"] if dtype == "int8" else [])
    if vision_layers:
        columns += ["layers"] + (["layers_scale"] if dtype == "int8" else [])
    return CacheView(uri=uri, shards=shards, dtype=dtype, columns=columns,
                     layer_index=layer_index if vision_layers else None,
                     image_tokens=base.image_tokens(int(select_shape[0])))


def cache_index(view: CacheView) -> tuple[dict[str, str], set[str]]:
    """(normalised source -> image_id, all image_ids), reading only those two columns."""
    by_source: dict[str, str] = {}
    ids: set[str] = set()
    for uri in view.shards:
        fs, path = storage.resolve(uri)
        table = pq.read_table(path, columns=["image_id", "source"], filesystem=fs)
        for image_id, source in zip(table["image_id"].to_pylist(), table["source"].to_pylist()):
            by_source.setdefault(_normalise(source), image_id)
            ids.add(image_id)
    return by_source, ids


def _normalise(path: str) -> str:
    return path if path.startswith("s3://") else os.path.abspath(path)


# --- records ----------------------------------------------------------------------------------------

def read_records(uri: str) -> list[tuple[int, dict | None, str | None]]:
    """(line number, record or None, error) per non-empty JSONL line; a ``.json`` file holding one array (as
    LLaVA's own data files do) gives (position, record, error) per element."""
    try:
        text = storage.read_bytes(uri).decode()
    except (FileNotFoundError, OSError) as err:
        raise FileNotFoundError(f"{uri}: cannot read the conversations file ({err})") from err
    out = []
    if uri.endswith(".json"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{uri}: not valid JSON ({err})") from err
        if not isinstance(items, list):
            raise ValueError(f"{uri}: expected a JSON array of records (or use JSON lines, .jsonl)")
        out = [(n, r, None) if isinstance(r, dict) else (n, None, "not a JSON object")
               for n, r in enumerate(items, start=1)]
    for n, line in enumerate(text.splitlines() if not out else [], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            out.append((n, record, None) if isinstance(record, dict) else (n, None, "not a JSON object"))
        except json.JSONDecodeError as err:
            out.append((n, None, f"invalid JSON ({err.msg})"))
    if not out:
        raise ValueError(f"{uri}: no records")
    return out


def resolve_image(record: dict, root: str) -> str:
    """The record's image as a path/URI comparable with the cache's `source` column."""
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise KeyError("no 'image' field")
    if image.startswith(("s3://", "/")):
        return _normalise(image)
    return _normalise(storage.join(root, image))


def tokenise_split(uri: str, tokenizer: Any, view: CacheView, by_source: dict[str, str], ids: set[str],
                   max_length: int, image_root: str | None = None, image_token_id: int | None = None,
                   ) -> tuple[list[Example], list[tuple[str, str]], int, int]:
    """-> (usable examples, [(reason, detail)] of bad rows, rows read, rows truncated to max_length).
    A record without an ``image`` (or ``image_id``) trains as text: no image tokens, no injection. Sequences
    over ``max_length`` lose their end (LLaVA truncates the same way); a row is dropped (reason "cut by
    data.max_length") only when the cut would split its image tokens or leave no answer token."""
    root = image_root or (uri.rsplit("/", 1)[0] if "/" in uri else ".")
    examples, bad, truncated = [], [], 0
    rows = read_records(uri)
    for line, record, error in rows:
        where = f"{uri}:{line}" + (f" id {record.get('id')!r}" if record and record.get("id") is not None else "")
        if record is None:
            bad.append(("invalid record", f"{where}: {error}"))
            continue
        image_id: str | None = None
        if record.get("image_id"):
            image_id = str(record["image_id"])
            if image_id not in ids:
                bad.append(("image not in the feature cache", f"{where}: image_id {image_id}"))
                continue
        elif "image" in record:
            try:
                source = resolve_image(record, root)
            except KeyError as err:
                bad.append(("invalid record", f"{where}: {err.args[0]}"))
                continue
            if source not in by_source:
                bad.append(("image not in the feature cache", f"{where}: {source}"))
                continue
            image_id = by_source[source]
        try:
            input_ids, labels = build_example(tokenizer, record.get("conversations") or [],
                                              view.image_tokens if image_id is not None else 0)
        except ValueError as err:
            text = str(err)
            reason = ("bad <image> placeholder" if "placeholder" in text else
                      "no answer to learn" if "answer" in text else "invalid conversation")
            bad.append((reason, f"{where}: {err}"))
            continue
        if len(input_ids) > max_length:
            images_at = [i for i, t in enumerate(input_ids) if t == image_token_id] if image_id is not None else []
            if (images_at and images_at[-1] >= max_length) or all(x == -100 for x in labels[1:max_length]):
                what = "its image tokens" if images_at and images_at[-1] >= max_length else "every answer"
                bad.append((CUT, f"{where}: {len(input_ids)} tokens > {max_length} would cut "
                                                      f"{what} ({view.image_tokens if image_id else 0} image tokens)"))
                continue
            input_ids, labels, truncated = input_ids[:max_length], labels[:max_length], truncated + 1
        examples.append(Example(idx=len(examples), image_id=image_id, input_ids=input_ids, labels=labels))
    return examples, bad, len(rows), truncated


def prepare_data(cfg: Any, base: Any, vision_layers: list[int]) -> PreparedData:
    """Everything that can be wrong with the data, found before any worker starts."""
    d = cfg.data
    if not d.train:
        raise ValueError("data.train is not set: give a LLaVA-format JSONL (data.train=path/to/train.jsonl)")
    if not d.features:
        raise ValueError("data.features is not set: give the feature cache built by `crosslayer features`")
    view = check_cache(d.features, base, vision_layers, cfg.cli.pool)
    model_max = int(getattr(base.text_config, "max_position_embeddings", 2048))
    max_length = d.max_length or min(2048, model_max)
    if max_length > model_max:
        raise ValueError(f"data.max_length={max_length} exceeds the model's limit of {model_max} positions")
    by_source, ids = cache_index(view)
    split = functools.partial(tokenise_split, tokenizer=base.tokenizer, view=view, by_source=by_source, ids=ids,
                              max_length=max_length, image_root=d.image_root, image_token_id=base.image_token_id)
    train, bad, n_train, truncated = split(d.train)
    evals, n_eval = [], 0
    if d.eval:
        evals, bad_eval, n_eval, truncated_eval = split(d.eval)
        bad, truncated = bad + bad_eval, truncated + truncated_eval
    fatal = [(reason, detail) for reason, detail in bad if reason != CUT]  # cut rows are dropped and counted
    if fatal and not d.skip_bad_rows:
        counts = Counter(reason for reason, _ in fatal)
        lines = []
        for reason, count in counts.most_common():
            shown = [detail for r, detail in fatal if r == reason][:SHOWN_PER_REASON]
            lines.append(f"  {reason}: {count} row(s), e.g. " + "; ".join(shown))
        raise ValueError(f"{len(fatal)} unusable row(s) in the training data:\n" + "\n".join(lines) +
                         "\nfix them, or set data.skip_bad_rows=true to skip and count them")
    if not d.eval and d.eval_fraction > 0 and len(train) > 1:
        train, evals = split_eval(train, d.eval_fraction, cfg.trainer.seed)
    world, micro = cfg.trainer.num_workers, cfg.trainer.micro_batch_size
    if 0 < len(evals) < world:
        raise ValueError(f"the eval split has {len(evals)} example(s), fewer than trainer.num_workers={world}; "
                         f"give more (data.eval / data.eval_fraction) or none (data.eval_fraction=0)")
    if len(train) < world * micro:
        raise ValueError(f"{len(train)} usable training examples, fewer than trainer.num_workers * "
                         f"trainer.micro_batch_size = {world} * {micro} = {world * micro}")
    return PreparedData(train=train, eval=evals, cache=view, max_length=max_length,
                        skipped=dict(Counter(reason for reason, _ in bad)),
                        rows_read={"train": n_train, "eval": n_eval}, truncated=truncated,
                        text_only=sum(e.image_id is None for e in [*train, *evals]))


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out round(fraction * n) examples (at least one) chosen by a seeded permutation; re-index both."""
    import torch

    n = len(examples)
    n_eval = min(n - 1, max(1, round(fraction * n)))
    held = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held]
    evals = [e for i, e in enumerate(examples) if i in held]
    for split in (train, evals):
        for i, e in enumerate(split):
            e.idx = i
    return train, evals


def rank_of(n: int, world: int, seed: int) -> list[int]:
    """Deal n examples to ranks by a seeded permutation: balanced, fixed for the whole run."""
    import torch

    ranks = [0] * n
    for j, i in enumerate(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()):
        ranks[i] = j % world
    return ranks


# --- Ray: one materialised dataset per rank ----------------------------------------------------------

def rank_datasets(prepared: PreparedData, world: int, seed: int) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """{"rank<r>": Dataset} holding rank r's train and eval examples (columns split, idx, input_ids, labels and
    the feature columns), and the examples per rank of each split. One Ray task per cache shard reads it once,
    joins its rows to the examples and returns one Arrow table per rank; the datasets are built from those
    (``ray.data.from_arrow_refs``), so they are materialised before any worker holds a CPU, without a pass over
    the cache per rank and without the features passing through the driver. No encoder anywhere."""
    import ray

    owners = {"train": rank_of(len(prepared.train), world, seed), "eval": [e.idx % world for e in prepared.eval]}
    sizes = {split: [ranks.count(r) for r in range(world)] for split, ranks in owners.items()}
    lookups: list[dict[str | None, list[tuple]]] = [{} for _ in range(world)]  # rank: image_id -> examples
    for split, code in SPLITS.items():
        for e, owner in zip(getattr(prepared, split), owners[split]):
            lookups[owner].setdefault(e.image_id, []).append((code, e.idx, e.input_ids, e.labels))
    join = ray.remote(num_returns=world)(_join_shard)
    lookups_ref = ray.put(lookups)
    parts = [join.remote(uri, prepared.cache.columns, lookups_ref, with_text=i == 0)  # text-only rows: once
             for i, uri in enumerate(prepared.cache.shards)]
    parts = [p if world > 1 else [p] for p in parts]  # (shards, ranks) ObjectRefs of Arrow tables
    datasets = {f"rank{r}": ray.data.from_arrow_refs([p[r] for p in parts]) for r in range(world)}
    for ds in datasets.values():
        ds.context.enable_progress_bars = False  # the workers iterate them: no progress bars in their logs
    return datasets, sizes


def _join_shard(uri: str, columns: list[str], lookups: list[dict[str | None, list[tuple]]],
                with_text: bool = False) -> Any:
    """One cache shard -> one joined table per rank (a bare table when there is one rank); ``with_text`` adds
    the text-only examples (lookup key None)."""
    fs, path = storage.resolve(uri)
    table = pq.read_table(path, columns=["image_id", *columns], filesystem=fs)
    tables = [_join_examples(table, lookup, with_text) for lookup in lookups]
    return tables if len(tables) > 1 else tables[0]


def _join_examples(table: pa.Table, lookup: dict[str | None, list[tuple]], with_text: bool = False) -> pa.Table:
    """Cache rows -> one row per example using that image: split, idx, input_ids, labels, has_image + the feature
    columns. With ``with_text``, the text-only examples (key None) follow, with has_image false and the features
    of the shard's first row as placeholders that no step reads (one schema for every row)."""
    rows, found, has_image = [], [], []
    for i, image_id in enumerate(table.column("image_id").to_pylist()):
        for example in lookup.get(image_id, ()):
            rows.append(i)
            found.append(example)
            has_image.append(True)
    for example in lookup.get(None, ()) if with_text and table.num_rows else ():
        rows.append(0)
        found.append(example)
        has_image.append(False)
    out = table.take(pa.array(rows, type=pa.int64())).drop_columns(["image_id"])
    out = out.append_column("has_image", pa.array(has_image, type=pa.bool_()))
    out = out.append_column("split", pa.array([e[0] for e in found], type=pa.int8()))
    out = out.append_column("idx", pa.array([e[1] for e in found], type=pa.int64()))
    out = out.append_column("input_ids", pa.array([e[2] for e in found], type=pa.list_(pa.int32())))
    return out.append_column("labels", pa.array([e[3] for e in found], type=pa.list_(pa.int32())))


def local_shard(prepared: PreparedData, split: str, pad_id: int) -> ShardData:
    """A whole split as one in-memory shard, without Ray: the rows ``rank_datasets`` would deal out (evaluating
    a saved adapter, a plain PyTorch loop in the benchmarks)."""
    tables = []
    for uri in prepared.cache.shards:
        fs, path = storage.resolve(uri)
        tables.append(pq.read_table(path, columns=["image_id", *prepared.cache.columns], filesystem=fs))
    by_image: dict[str | None, list[tuple]] = {}
    for e in getattr(prepared, split):
        by_image.setdefault(e.image_id, []).append((SPLITS[split], e.idx, e.input_ids, e.labels))
    return ShardData(_join_examples(pa.concat_tables(tables), by_image, with_text=True), prepared.cache, pad_id)


# --- worker side -------------------------------------------------------------------------------------

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
            features = VisionFeatures(select_features=f.select_features.to(device),
                                      layers=f.layers.to(device) if f.layers is not None else None,
                                      rows=f.rows.to(device) if f.rows is not None else None)
        return Batch(input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                     labels=self.labels.to(device), features=features, tokens=self.tokens)


class ShardData:
    """One rank's examples with their features, in memory, sorted by example index."""

    def __init__(self, table: pa.Table, view: CacheView, pad_id: int):
        table = table.sort_by("idx")
        idx = table["idx"].to_numpy()
        keep = np.ones(len(idx), dtype=bool)
        keep[1:] = idx[1:] != idx[:-1]  # an image cached twice (same bytes, two paths) joins twice: keep one
        self.idx = idx[keep]
        self.input_ids = [ids for ids, k in zip(table["input_ids"].to_pylist(), keep) if k]
        self.labels = [lab for lab, k in zip(table["labels"].to_pylist(), keep) if k]
        self.has_image = table["has_image"].to_numpy(zero_copy_only=False)[keep]  # (n,) bool
        self.arrays = {c: _tensor_numpy(table[c])[keep] for c in view.columns}  # stored dtype, (n, ...)
        self.view, self.pad_id = view, pad_id

    @classmethod
    def from_iterator(cls, iterator: Any, view: CacheView, pad_id: int) -> dict[str, ShardData]:
        """A rank's dataset shard -> {"train": ShardData, "eval": ShardData} (either may be empty)."""
        import pyarrow.compute as pc

        batches = iterator.iter_batches(batch_format="pyarrow", batch_size=1024, prefetch_batches=0)
        table = pa.concat_tables(batches)
        return {split: cls(table.filter(pc.equal(table["split"], code)), view, pad_id)
                for split, code in SPLITS.items()}

    def __len__(self) -> int:
        return len(self.idx)

    def batch(self, rows: Any) -> Batch:
        import torch

        from cli_module.model import VisionFeatures

        rows = np.asarray(rows, dtype=np.int64)
        length = max(len(self.input_ids[i]) for i in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for j, i in enumerate(rows):  # right padding: FusedVLM derives positions from the mask
            n = len(self.input_ids[i])
            ids[j, :n] = torch.tensor(self.input_ids[i])
            labels[j, :n] = torch.tensor(self.labels[i])
            mask[j, :n] = 1
        with_image = self.has_image[rows]  # (B,) bool: text-only rows get no features and no injection
        features = None
        if with_image.any():
            picked = {c: a[rows[with_image]] for c, a in self.arrays.items()}
            select = decode_column(picked, "select", self.view.dtype)  # (B', N, Dv) float32
            layers = None
            if self.view.layer_index is not None:
                layers = decode_column(picked, "layers", self.view.dtype)[:, self.view.layer_index]  # (B', K, N', Dv)
            features = VisionFeatures(select_features=select, layers=layers,
                                      rows=None if with_image.all() else torch.from_numpy(with_image))
        return Batch(input_ids=ids, attention_mask=mask, labels=labels, features=features, tokens=int(mask.sum()))


def _tensor_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-shape tensor column (Arrow's canonical type or Ray's own) -> numpy (n, ...)."""
    array = column.combine_chunks()
    if isinstance(array, pa.FixedShapeTensorArray):
        return array.to_numpy_ndarray()
    return np.asarray(array.to_numpy(zero_copy_only=False))


def order_seed(seed: int, epoch: int, rank: int) -> int:
    digest = hashlib.sha256(f"crosslayer-train/{seed}/{epoch}/{rank}".encode()).hexdigest()
    return int(digest[:15], 16)


class MicroBatches:
    """Micro-batch m of a rank = rows of its shard at positions [p*B, (p+1)*B) of epoch e's order, with
    (e, p) = divmod(m, per_epoch) and the order a torch.randperm seeded by (seed, e, rank)."""

    def __init__(self, size: int, micro_batch: int, per_epoch: int, seed: int, rank: int):
        self.size, self.micro_batch, self.per_epoch, self.seed, self.rank = size, micro_batch, per_epoch, seed, rank
        self._epoch, self._order = -1, None

    def rows(self, m: int) -> tuple[int, np.ndarray]:
        """-> (epoch, shard positions of micro-batch m)."""
        import torch

        epoch, pos = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(order_seed(self.seed, epoch, self.rank))
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=gen).numpy()
        return epoch, self._order[pos * self.micro_batch:(pos + 1) * self.micro_batch]


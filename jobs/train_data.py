"""Training data for ``crosslayer train``, driver side: LLaVA conversations checked, tokenised once and located
in the feature cache before any worker starts. No encoder runs here.

1. ``check_cache``: the cache's key against the model (base, revision, image processor and select layer equal;
   the layers the method needs present; pooling equal when layers are needed). Without ``data.features`` the
   workers encode images on the fly instead (``CacheView.uri`` is None).
2. ``tokenise``: every record rendered through the base's chat template with answer-only labels, sequences over
   ``data.max_length`` cut at the end. Parallel Ray tasks (``data.tokenize_chunk`` records each); the result is
   cached next to the run (``<output_dir>/token-cache/``), keyed by the data file's bytes, the tokenizer, the chat
   template, ``max_length`` and the image token count, so a resume or a second run reuses it.
3. ``prepare_data``: each row's image resolved (``image_id`` field, else the path against ``data.image_root`` or
   the file's folder) to a cache row: (shard, row group, row), so an image is stored once however many examples
   use it. Bad rows fail the run, or are skipped and counted with ``data.skip_bad_rows``. The eval split is held
   out; ``write_examples`` writes the run's examples (tokens + feature locations, no features) as one Parquet
   file the workers read their own rows from (``jobs.train_stream``).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cli_module.prompting import build_example
from pipelines import storage
from pipelines.feature_cache import check_serves, shard_uris

SHOWN_PER_REASON = 3  # examples of each kind of bad row quoted in the error
SPLITS = {"train": 0, "eval": 1}  # value of the `split` column of the examples file
CUT = "cut by data.max_length"  # the reason of rows dropped because max_length would cut their image or answers
TOKEN_FORMAT = 1  # bump when the token cache's columns or meaning change


@dataclass
class Example:
    idx: int  # position among the usable examples of its split: the stable sort key
    image_id: str | None  # the image's id (sha256 of its bytes); None: a text-only example
    input_ids: list[int]  # (S,) prompt + answer, <image> expanded to the image's token count
    labels: list[int]  # (S,) answer tokens, -100 elsewhere
    location: tuple[int, int, int] | None = None  # (shard, row group, row) of its features in the cache
    source: str | None = None  # the image's path / URI, kept only without a cache (workers encode on the fly)


@dataclass
class CacheView:
    """How a worker reads this model's features (plain values: travels to the workers)."""

    uri: str | None  # cache folder or s3:// prefix; None: no cache, workers encode decoded images on the fly
    shards: list[str]  # Parquet shard URIs (index = Example.location[0])
    dtype: str | None  # storage dtype: float16, bfloat16 or int8
    columns: list[str]  # feature columns to read (select[, layers][, *_scale])
    layer_index: list[int] | None  # positions of the model's feature layers in the cache's `layers`; None = unused
    image_tokens: int  # placeholder tokens per image: select's N (+1 for OneVision's image_newline); 1 per_image
    per_image: bool = False  # a Qwen cache: each image its own count, the tokens' one placeholder expanded to it
    #                          from the cache's `tokens` column when the example is located


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    cache: CacheView
    max_length: int  # the enforced sequence limit
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows skipped (skip_bad_rows, cut rows)
    rows_read: dict[str, int] = field(default_factory=dict)  # split -> rows read
    truncated: int = 0  # examples cut to max_length (their answers past it are lost)
    text_only: int = 0  # examples without an image (trained as text)
    token_cache: dict[str, bool] = field(default_factory=dict)  # data file -> True when its tokens were reused


# --- the cache against the model ---------------------------------------------------------------------

def check_cache(uri: str, base: Any, vision_layers: list[int], pool: int, deepstack: bool = False) -> CacheView:
    """Refuse a cache built for another base / encoder settings or lacking the layers the model reads (or, with
    ``deepstack``, the blocks Qwen3-VL's own DeepStack reads)."""
    info, layer_index = check_serves(uri, base, vision_layers, pool, deepstack)
    dtype = info["key"]["dtype"]
    shards = shard_uris(uri)
    if not shards:
        raise ValueError(f"feature cache {uri} holds no shards; build it with `crosslayer features`")
    fs, path = storage.resolve(shards[0])
    schema = pq.ParquetFile(fs.open_input_file(path)).schema_arrow
    per_image = "tokens" in schema.names  # a Qwen cache: rows of their own token counts (feature_cache's format)
    names = ["select"] + (["layers"] if vision_layers else []) + (["deepstack"] if per_image and deepstack else [])
    columns = [c for n in names for c in ([n, f"{n}_scale"] if dtype == "int8" else [n])]
    if per_image:
        columns += ["tokens", "image_grid_thw"]
    return CacheView(uri=uri, shards=shards, dtype=dtype, columns=columns,
                     layer_index=layer_index if vision_layers else None,
                     image_tokens=1 if per_image else base.image_tokens(int(schema.field("select").type.shape[0])),
                     per_image=per_image)


def encoder_view(base: Any) -> CacheView:
    """No cache: the workers run the frozen encoder on each micro-batch's decoded images (one whole-image crop)."""
    from cli_module.model import crop_tokens

    if base.qwen:  # each image's count from its size under the processor's resize (``image_counts``)
        return CacheView(uri=None, shards=[], dtype=None, columns=[], layer_index=None, image_tokens=1,
                         per_image=True)
    return CacheView(uri=None, shards=[], dtype=None, columns=[], layer_index=None,
                     image_tokens=base.image_tokens(crop_tokens(base)))


@dataclass
class CacheIndex:
    by_source: dict[str, str]  # normalised source -> image_id
    where: dict[str, tuple[int, int, int]]  # image_id -> (shard, row group, row)
    tokens: dict[str, int] = field(default_factory=dict)  # image_id -> its token count (a per-image cache)


def cache_index(view: CacheView) -> CacheIndex:
    """Where every cached image lives, reading only the ``image_id`` and ``source`` columns and the footers."""
    by_source: dict[str, str] = {}
    where: dict[str, tuple[int, int, int]] = {}
    tokens: dict[str, int] = {}
    names = ["image_id", "source"] + (["tokens"] if view.per_image else [])
    for s, uri in enumerate(view.shards):
        fs, path = storage.resolve(uri)
        meta = pq.ParquetFile(fs.open_input_file(path))
        for g in range(meta.num_row_groups):
            table = meta.read_row_group(g, columns=names)
            counts = table["tokens"].to_pylist() if view.per_image else [0] * table.num_rows
            for r, (image_id, source, n) in enumerate(zip(table["image_id"].to_pylist(), table["source"].to_pylist(),
                                                          counts)):
                by_source.setdefault(storage.image_key(source), image_id)
                where.setdefault(image_id, (s, g, r))
                tokens.setdefault(image_id, n)
    return CacheIndex(by_source=by_source, where=where, tokens=tokens if view.per_image else {})


# --- records ----------------------------------------------------------------------------------------

def _read_data(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except (FileNotFoundError, OSError) as err:
        raise FileNotFoundError(f"{uri}: cannot read the conversations file ({err})") from err


def read_records(uri: str) -> list[tuple[int, dict | None, str | None]]:
    """(line number, record or None, error) per non-empty JSONL line; a ``.json`` file holding one array (as
    LLaVA's own data files do) gives (position, record, error) per element."""
    return parse_records(uri, _read_data(uri))


def parse_records(uri: str, data: bytes) -> list[tuple[int, dict | None, str | None]]:
    """``read_records`` on the bytes of ``uri``."""
    text = data.decode()
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
        return storage.image_key(image)
    return storage.image_key(storage.join(root, image))


# --- tokenising, once per data file and tokenizer ------------------------------------------------------

@dataclass
class TokenSpec:
    """Everything a token sequence depends on (the token cache's key)."""

    tokenizer: Any  # the base's tokenizer (chat template included)
    image_tokens: int  # placeholder tokens per image
    image_token_id: int  # their id
    max_length: int  # the sequence limit

    def key(self, data: bytes) -> str:
        tok = self.tokenizer
        vocab = tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else json.dumps(tok.get_vocab())
        parts = {"format": TOKEN_FORMAT, "data": hashlib.sha256(data).hexdigest(),
                 "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(), "chat_template": tok.chat_template,
                 "image_tokens": self.image_tokens, "image_token_id": self.image_token_id,
                 "max_length": self.max_length, "eos": tok.eos_token}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


TOKEN_SCHEMA = pa.schema([("line", pa.int64()), ("id", pa.string()), ("image", pa.string()),
                          ("image_id", pa.string()), ("input_ids", pa.list_(pa.int32())),
                          ("labels", pa.list_(pa.int32())), ("truncated", pa.bool_()), ("reason", pa.string()),
                          ("detail", pa.string())])


def tokenise_rows(rows: list[tuple[int, dict | None, str | None]], spec: TokenSpec) -> list[dict[str, Any]]:
    """One token row per record: the sequence (cut at max_length), or the reason it is unusable. Whether its
    image is cached is not decided here (the cache may change; the tokens do not)."""
    out = []
    for line, record, error in rows:
        row: dict[str, Any] = {"line": line, "id": None, "image": None, "image_id": None, "input_ids": None,
                               "labels": None, "truncated": False, "reason": None, "detail": None}
        out.append(row)
        if record is None:
            row.update(reason="invalid record", detail=error)
            continue
        row["id"] = None if record.get("id") is None else str(record.get("id"))
        if record.get("image_id"):
            row["image_id"] = str(record["image_id"])
        elif "image" in record:
            image = record["image"]
            if not isinstance(image, str) or not image:
                row.update(reason="invalid record", detail="no 'image' field")
                continue
            row["image"] = image
        has_image = row["image"] is not None or row["image_id"] is not None
        try:
            ids, labels = build_example(spec.tokenizer, record.get("conversations") or [],
                                        spec.image_tokens if has_image else 0)
        except ValueError as err:
            text = str(err)
            reason = ("bad <image> placeholder" if "placeholder" in text else
                      "no answer to learn" if "answer" in text else "invalid conversation")
            row.update(reason=reason, detail=text)
            continue
        if len(ids) > spec.max_length:
            image_at = [i for i, t in enumerate(ids) if t == spec.image_token_id] if has_image else []
            if (image_at and image_at[-1] >= spec.max_length) or all(x == -100 for x in labels[1:spec.max_length]):
                what = "its image tokens" if image_at and image_at[-1] >= spec.max_length else "every answer"
                row.update(reason=CUT, detail=f"{len(ids)} tokens > {spec.max_length} would cut {what} "
                                              f"({spec.image_tokens if has_image else 0} image tokens)")
                continue
            ids, labels, row["truncated"] = ids[:spec.max_length], labels[:spec.max_length], True
        row["input_ids"], row["labels"] = ids, labels
    return out


def tokenise(uri: str, spec: TokenSpec, cache_dir: str | None, chunk: int) -> tuple[pa.Table, bool]:
    """-> (token rows of the data file, reused from the token cache?). Chunks of ``chunk`` records are
    tokenised by parallel Ray tasks (inline when there is one chunk)."""
    data = _read_data(uri)
    key = spec.key(data)
    cached = storage.join(cache_dir, f"tokens-{key}.parquet") if cache_dir else None
    if cached and storage.exists(cached):
        return pq.read_table(io.BytesIO(storage.read_bytes(cached))), True
    rows = parse_records(uri, data)
    chunks = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
    if len(chunks) > 1:
        import ray

        if not ray.is_initialized():
            ray.init(configure_logging=False)
        task = ray.remote(tokenise_rows)
        spec_ref = ray.put(spec)
        parts = ray.get([task.remote(c, spec_ref) for c in chunks])
    else:
        parts = [tokenise_rows(c, spec) for c in chunks]
    table = pa.Table.from_pylist([r for part in parts for r in part], schema=TOKEN_SCHEMA)
    if cached:
        sink = io.BytesIO()
        pq.write_table(table, sink)
        storage.write_atomic(cached, sink.getvalue())
    return table, False


# --- the run's examples -----------------------------------------------------------------------------------

def expand_image(ids: list[int], labels: list[int], image_token_id: int, count: int, max_length: int,
                 ) -> tuple[list[int], list[int], bool] | str:
    """A sequence holding one image placeholder -> the same with ``count`` (labels -100), cut to ``max_length``:
    (ids, labels, cut?), or why it cannot be used (the cut would take its image tokens or every answer)."""
    at = ids.index(image_token_id)
    ids = ids[:at] + [image_token_id] * count + ids[at + 1:]
    labels = labels[:at] + [-100] * count + labels[at + 1:]
    if len(ids) <= max_length:
        return ids, labels, False
    if at + count > max_length or all(x == -100 for x in labels[1:max_length]):
        what = "its image tokens" if at + count > max_length else "every answer"
        return f"{len(ids)} tokens > {max_length} would cut {what} ({count} image tokens)"
    return ids[:max_length], labels[:max_length], True


def image_count(source: str, processor: Any) -> int:
    """A Qwen image's token count without a cache: the image decoded as the workers decode it, its size through
    the processor's resize (``pipelines.pixels.image_tokens``)."""
    from pipelines.images import decode_image
    from pipelines.pixels import image_tokens

    image = decode_image(storage.read_bytes(source))
    return image_tokens(processor, *image.size)


def locate(uri: str, tokens: pa.Table, view: CacheView, index: CacheIndex | None, image_root: str | None,
           image_token_id: int = -1, max_length: int = 0, processor: Any = None,
           ) -> tuple[list[Example], list[tuple[str, str]], int]:
    """Token rows -> (usable examples in file order, [(reason, detail)] of unusable rows, rows truncated). A
    per-image view's examples get their image's token count here (``expand_image``, ``max_length`` applied): from
    the cache's ``tokens``, or without a cache from the image and ``processor`` (``image_count``)."""
    root = image_root or (uri.rsplit("/", 1)[0] if "/" in uri else ".")
    examples, bad, truncated = [], [], 0
    for row in tokens.to_pylist():
        where = f"{uri}:{row['line']}" + (f" id {row['id']!r}" if row["id"] is not None else "")
        if row["reason"]:
            bad.append((row["reason"], f"{where}: {row['detail']}"))
            continue
        image_id, source, location = row["image_id"], None, None
        if row["image"] is not None:
            source = resolve_image({"image": row["image"]}, root)
            if index is not None:
                image_id = index.by_source.get(source)
                if image_id is None:
                    bad.append(("image not in the feature cache", f"{where}: {source}"))
                    continue
        elif image_id is not None and index is None:
            bad.append(("image_id without a feature cache", f"{where}: an image_id names a cache row; set "
                                                            f"data.features, or give the image's path"))
            continue
        elif image_id is not None and image_id not in index.where:
            bad.append(("image not in the feature cache", f"{where}: image_id {image_id}"))
            continue
        if image_id is not None and index is not None:
            location, source = index.where[image_id], None  # read from the cache: the path is not needed
        elif source is not None:
            image_id = hashlib.sha256(source.encode()).hexdigest()[:32]  # encoded on the fly: any stable id
        input_ids, labels, cut = row["input_ids"], row["labels"], bool(row["truncated"])
        if view.per_image and (location is not None or source is not None):
            try:
                count = index.tokens[image_id] if location is not None else image_count(source, processor)
            except Exception as err:  # noqa: BLE001 (an unreadable image is a bad row, as the cache would record)
                bad.append(("unreadable image", f"{where}: {source}: {type(err).__name__}: {err}"[:500]))
                continue
            expanded = expand_image(input_ids, labels, image_token_id, count, max_length)
            if isinstance(expanded, str):
                bad.append((CUT, f"{where}: {expanded}"))
                continue
            input_ids, labels, cut = expanded[0], expanded[1], cut or expanded[2]
        truncated += cut
        examples.append(Example(idx=len(examples), image_id=image_id, input_ids=input_ids,
                                labels=labels, location=location, source=source))
    return examples, bad, truncated


def prepare_data(cfg: Any, base: Any, vision_layers: list[int]) -> PreparedData:
    """Everything that can be wrong with the data, found before any worker starts."""
    d = cfg.data
    if not d.train:
        raise ValueError("data.train is not set: give a LLaVA-format JSON / JSONL (data.train=path/to/train.jsonl)")
    from cli_module.methods import method_class

    deepstack = base.kind == "qwen3_vl" and method_class(cfg.cli.method).base_deepstack  # its own DeepStack kept
    view = (check_cache(d.features, base, vision_layers, cfg.cli.pool, deepstack) if d.features
            else encoder_view(base))
    model_max = int(getattr(base.text_config, "max_position_embeddings", 2048))
    max_length = d.max_length or min(2048, model_max)
    if max_length > model_max:
        raise ValueError(f"data.max_length={max_length} exceeds the model's limit of {model_max} positions")
    index = cache_index(view) if view.uri else None
    spec = TokenSpec(tokenizer=base.tokenizer, image_tokens=view.image_tokens, image_token_id=base.image_token_id,
                     max_length=max_length)
    cache_dir = storage.join(cfg.output_dir, "token-cache") if d.token_cache else None
    splits, bad, truncated, reused, rows_read = {}, [], 0, {}, {}
    for split, uri in (("train", d.train), ("eval", d.eval)):
        if not uri:
            splits[split], rows_read[split] = [], 0
            continue
        tokens, reused[uri] = tokenise(uri, spec, cache_dir, d.tokenize_chunk)
        splits[split], split_bad, split_truncated = locate(uri, tokens, view, index, d.image_root,
                                                           base.image_token_id, max_length, base.image_processor)
        bad, truncated, rows_read[split] = bad + split_bad, truncated + split_truncated, tokens.num_rows
    train, evals = splits["train"], splits["eval"]
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
                        skipped=dict(Counter(reason for reason, _ in bad)), rows_read=rows_read,
                        truncated=truncated, text_only=sum(e.image_id is None for e in [*train, *evals]),
                        token_cache=reused)


EXAMPLE_SCHEMA = pa.schema([("split", pa.int8()), ("idx", pa.int64()), ("image_id", pa.string()),
                            ("shard", pa.int32()), ("row_group", pa.int32()), ("row", pa.int32()),
                            ("source", pa.string()), ("input_ids", pa.list_(pa.int32())),
                            ("labels", pa.list_(pa.int32()))])


def examples_table(examples: dict[str, list[Example]]) -> pa.Table:
    """Examples by split name -> the examples file's rows (tokens and feature locations, no features)."""
    rows = []
    for split, items in examples.items():
        for e in items:
            shard, group, row = e.location or (-1, -1, -1)
            rows.append({"split": SPLITS[split], "idx": e.idx, "image_id": e.image_id, "shard": shard,
                         "row_group": group, "row": row, "source": e.source, "input_ids": e.input_ids,
                         "labels": e.labels})
    return pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)


def write_examples(prepared: PreparedData, uri: str) -> str:
    """The run's examples as one Parquet file; each worker reads its own rows from it. Returns ``uri``."""
    sink = io.BytesIO()
    pq.write_table(examples_table({split: getattr(prepared, split) for split in SPLITS}), sink, row_group_size=8192)
    storage.write_atomic(uri, sink.getvalue())
    return uri


# --- splits and ranks ------------------------------------------------------------------------------

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


def rank_sizes(prepared: PreparedData, world: int, seed: int) -> dict[str, list[int]]:
    """Examples per rank of each split: train dealt by ``rank_of``, eval by ``idx % world`` (as the workers do)."""
    owners = {"train": rank_of(len(prepared.train), world, seed), "eval": [e.idx % world for e in prepared.eval]}
    return {split: [ranks.count(r) for r in range(world)] for split, ranks in owners.items()}

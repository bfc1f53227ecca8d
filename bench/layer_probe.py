"""What each vision layer knows: linear probes of the scene's attributes from one cached layer at a time.

CLI's premise is that the layer one-to-one reads (the last) is not the one that holds every kind of visual
information. This measures it on the quality benchmark's own data and cache: for every object of a synthetic
scene (``scenes.jsonl``), a ridge classifier reads the 2x2 pooled tokens of the object's quadrant in one vision
layer and predicts its colour, shape and texture; the dot count is read from all tokens of the layer. Trained
on the training images, the ridge penalty chosen on the validation images, scored on the test images. A layer
that scores far above another holds that attribute more linearly; what a frozen LLM can read through a small
projector is closer to this than to what a deep probe could dig out.

    python bench/layer_probe.py --work out/quality-powered      # after bench/quality_powered.py built its cache

``--types``: one probe per question type of the data set (``meta.json``'s types, control and headroom; see
``TYPE_PROBES`` for what each reads), and per type the gap between the best layer below the cache's select layer
and the select layer itself, with a 95% bootstrap interval that resamples whole test images (issue 28, part 1:
a headroom type needs a gap of at least ``--min-gap``). ``--data`` and ``--cache`` may point anywhere:

    python bench/layer_probe.py --types --data DATA --cache CACHE --results bench/headroom-probe-results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUADRANTS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
PENALTIES = (1e-3, 1e-2, 0.1, 1.0, 10.0)  # ridge penalty per training example
# --types: what each question type's probe reads (input tokens -> label), one row per object / quadrant / image
TYPE_PROBES = {
    "color": "each object's colour, from its quadrant",
    "shape": "each object's shape, from its quadrant",
    "texture": "each object's texture (striped / plain), from its quadrant",
    "stripes": "each striped object's stripe orientation, from its quadrant",
    "count": "the number of dots, from all tokens",
    "position": "each quadrant's shape or 'empty' (where each shape is), from the quadrant",
    "relation": "each quadrant's colour + shape or 'empty' (what a neighbour is), from the quadrant",
    "frequency": "each striped object's stripe frequency (fine / medium / coarse), from its quadrant",
    "arrow": "each object's arrow direction, from its quadrant",
    "mark": "the mark's colour, from the pooled token holding its centre",
}


def quadrant_tokens(tokens: np.ndarray, quadrant: str) -> np.ndarray:
    """tokens (N, D) of a square grid -> the quadrant's tokens flattened ((N/4) * D,)."""
    side = int(round(len(tokens) ** 0.5))
    grid = tokens.reshape(side, side, -1)  # (side, side, D)
    r, c = QUADRANTS[quadrant]
    h = side // 2
    return grid[r * h:(r + 1) * h, c * h:(c + 1) * h].reshape(-1)


def ridge_accuracy(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> tuple[float, float]:
    """One-vs-rest ridge classifier on standardised features: (test accuracy, the penalty chosen on val)."""
    acc, lam, _ = ridge_predict(x, y)
    return acc, lam


def ridge_predict(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> tuple[float, float, np.ndarray]:
    """``ridge_accuracy`` plus the per-test-row correctness (bool (n_test,)). With fewer training rows than
    features it solves the same ridge in its dual form (n x n instead of F x F): the same weights, faster."""
    mean, std = x["train"].mean(0), x["train"].std(0) + 1e-6
    xs = {k: (v - mean) / std for k, v in x.items()}
    classes = np.unique(y["train"])
    onehot = (y["train"][:, None] == classes[None, :]).astype(np.float64)  # (n, C)
    n, f = xs["train"].shape
    dual = n < f
    gram = xs["train"] @ xs["train"].T if dual else xs["train"].T @ xs["train"]  # (n, n) or (F, F)
    best = (-1.0, 0.0, np.zeros(0, dtype=bool))
    for lam in PENALTIES:
        ridge = gram + lam * n * np.eye(len(gram))
        w = xs["train"].T @ np.linalg.solve(ridge, onehot) if dual else np.linalg.solve(ridge, xs["train"].T @ onehot)
        val = float((classes[(xs["val"] @ w).argmax(1)] == y["val"]).mean())  # w: (F, C)
        if val > best[0]:
            best = (val, lam, classes[(xs["test"] @ w).argmax(1)] == y["test"])
    return float(best[2].mean()), best[1], best[2]


def cell_token(tokens: np.ndarray, xy: list[int], image_size: int) -> np.ndarray:
    """tokens (N, D) of a square grid over an image of ``image_size`` pixels -> the token holding pixel xy (D,)."""
    side = int(round(len(tokens) ** 0.5))
    col, row = (min(side - 1, v * side // image_size) for v in xy)
    return tokens[row * side + col]


def type_rows(qtype: str, scene: dict, tokens: np.ndarray) -> list[tuple[np.ndarray, str]]:
    """The probe rows (input features, label) one image gives question type ``qtype`` (``TYPE_PROBES``)."""
    objects = scene["objects"]
    if qtype in ("color", "shape", "texture", "arrow"):
        return [(quadrant_tokens(tokens, o["quadrant"]), o[qtype]) for o in objects]
    if qtype in ("stripes", "frequency"):
        return [(quadrant_tokens(tokens, o["quadrant"]), o[qtype]) for o in objects if o["texture"] == "striped"]
    if qtype == "count":
        return [(tokens.reshape(-1), str(len(scene["dots"])))]
    if qtype in ("position", "relation"):
        by_quadrant = {o["quadrant"]: o for o in objects}
        out = []
        for q in QUADRANTS:
            o = by_quadrant.get(q)
            label = "empty" if o is None else o["shape"] if qtype == "position" else f"{o['color']} {o['shape']}"
            out.append((quadrant_tokens(tokens, q), label))
        return out
    if qtype == "mark":
        return [(cell_token(tokens, scene["mark"]["center"], scene["size"]), scene["mark"]["color"])]
    raise ValueError(f"no probe for question type {qtype!r}; known: {sorted(TYPE_PROBES)}")


def paired_gap_interval(a: np.ndarray, b: np.ndarray, groups: np.ndarray, draws: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of mean(a) - mean(b) (per-row correctness, paired), resampling whole groups."""
    rng = np.random.default_rng(seed)
    ids, inverse = np.unique(groups, return_inverse=True)
    diff = np.bincount(inverse, a.astype(float) - b.astype(float), len(ids))  # per group: sum of differences
    size = np.bincount(inverse, minlength=len(ids)).astype(float)
    picks = rng.integers(len(ids), size=(draws, len(ids)))  # (draws, groups)
    gaps = diff[picks].sum(1) / size[picks].sum(1)
    lo, hi = np.quantile(gaps, [0.025, 0.975])
    return float(lo), float(hi)


def compact_json(summary: dict) -> str:
    """The results file: one line per type, floats to 4 places."""
    def rounded(v):
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, dict):
            return {str(k): rounded(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rounded(x) for x in v]
        return v

    body = {k: v for k, v in rounded(summary).items() if k != "types"}
    head = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in body.items())
    types = ",\n".join(f"  {json.dumps(t)}: {json.dumps(v)}" for t, v in rounded(summary["types"]).items())
    return f'{{\n{head},\n "types": {{\n{types}\n }}\n}}'


def probe_types(data: Path, cache: str, results: str, min_gap: float) -> int:
    """--types: the per-question-type table and headroom verdicts (see the module docstring)."""
    from pipelines.feature_cache import load_cache_table, read_cache_info, table_to_numpy

    key = read_cache_info(cache)["key"]
    layers, select = key["layers"], key["select_layer"]
    if select not in layers:
        raise ValueError(f"{cache} does not hold the select layer {select} in its layers {layers}; rebuild it with "
                         f"--vision-layers including {select}, so both sides of the gap use the same pooling")
    earlier = [k for k in layers if k < select]
    if not earlier:
        raise ValueError(f"{cache} holds no layer below the select layer {select}: {layers}")
    meta = json.loads((data / "meta.json").read_text())
    cols = table_to_numpy(load_cache_table(cache))
    row = {Path(str(src)).stem: r for r, src in enumerate(cols["source"])}  # image file stem -> cache row
    feats = cols["layers"].astype(np.float32)  # (images, K, N', D)
    scenes = {Path(s["image"]).stem: s["scene"] for s in map(json.loads, (data / "scenes.jsonl").read_text().splitlines())}
    split_of = {Path(json.loads(x)["image"]).stem: split for split in ("train", "val", "test")
                for x in (data / f"{split}.jsonl").read_text().splitlines()}
    missing = [stem for stem in split_of if stem not in row]
    if missing:
        raise ValueError(f"{len(missing)} images of {data} are not in {cache} (e.g. {missing[0]}); build the cache "
                         f"from {data / 'images'}")
    table: dict[str, dict] = {}
    for qtype in meta["types"]:
        by_layer, correct = {}, {}
        for k, layer in enumerate(layers):
            x: dict[str, list] = {"train": [], "val": [], "test": []}
            y: dict[str, list] = {"train": [], "val": [], "test": []}
            groups = []
            for stem, split in split_of.items():
                for features, label in type_rows(qtype, scenes[stem], feats[row[stem], k]):
                    x[split].append(features)
                    y[split].append(label)
                    if split == "test":
                        groups.append(stem)
            acc, lam, correct[layer] = ridge_predict({s: np.stack(v) for s, v in x.items()},
                                                     {s: np.array(v) for s, v in y.items()})
            majority = max(set(y["train"]), key=y["train"].count)
            by_layer[layer] = {"accuracy": acc, "penalty": lam}
            print(f"[probe] {qtype} layer {layer}: {acc:.3f} (penalty {lam})", flush=True)
        best = max(earlier, key=lambda k: by_layer[k]["accuracy"])
        gap = by_layer[best]["accuracy"] - by_layer[select]["accuracy"]
        lo, hi = paired_gap_interval(correct[best], correct[select], np.array(groups))
        table[qtype] = {"probe": TYPE_PROBES[qtype], "layers": by_layer, "test_rows": len(y["test"]),
                        "test_images": len(set(groups)), "classes": len(set(y["train"])),
                        "majority": float(np.mean(np.array(y["test"]) == majority)),
                        "best_earlier_layer": best, "gap": gap, "gap_ci95": [lo, hi],
                        "headroom": bool(gap >= min_gap)}
    head = ["| type (probe rows, test) | " + " | ".join(f"layer {k}" for k in layers)
            + " | most frequent | best earlier - select [95% CI] | gap >= " + f"{min_gap:.2f} |",
            "|---|" + "---|" * (len(layers) + 3)]
    for qtype, t in table.items():
        head.append(f"| {qtype} ({t['test_rows']}) | "
                    + " | ".join(f"**{t['layers'][k]['accuracy']:.3f}**" if k == t["best_earlier_layer"]
                                 else f"{t['layers'][k]['accuracy']:.3f}" for k in layers)
                    + f" | {t['majority']:.3f} | {t['gap']:+.3f} [{t['gap_ci95'][0]:+.3f}, {t['gap_ci95'][1]:+.3f}]"
                    + f" (layer {t['best_earlier_layer']}) | {'yes' if t['headroom'] else 'no'} |")
    summary = {"data": str(data), "cache": cache, "select_layer": select, "layers": layers, "pool": key["pool"],
               "min_gap": min_gap, "images": {s: sum(v == s for v in split_of.values()) for s in ("train", "val", "test")},
               "types": table, "table": "\n".join(head)}
    Path(results).write_text(compact_json(summary) + "\n")
    print("\n".join(head))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="out/quality-powered", help="bench/quality_powered.py's --work")
    ap.add_argument("--cache", default="cache-pool2", help="the feature cache under --work")
    ap.add_argument("--results", default="bench/layer-probe-results.json")
    ap.add_argument("--types", action="store_true", help="one probe per question type of the data (see above)")
    ap.add_argument("--data", default=None, help="--types: the data set folder (default WORK/data)")
    ap.add_argument("--min-gap", type=float, default=0.20, help="--types: the gap a headroom type needs")
    args = ap.parse_args()
    if args.types:
        cache = args.cache if Path(args.cache).is_absolute() or Path(args.cache).exists() else str(Path(args.work) / args.cache)
        return probe_types(Path(args.data) if args.data else Path(args.work) / "data", cache, args.results, args.min_gap)

    from pipelines.feature_cache import load_cache_table, read_cache_info, table_to_numpy

    work = Path(args.work)
    data, cache = work / "data", str(work / args.cache)
    layers = read_cache_info(cache)["key"]["layers"]
    cols = table_to_numpy(load_cache_table(cache))
    row = {Path(str(src)).stem: r for r, src in enumerate(cols["source"])}  # image file stem -> cache row
    feats = cols["layers"].astype(np.float32)  # (images, K, N, D)
    scenes = {Path(s["image"]).stem: s["scene"] for s in map(json.loads, (data / "scenes.jsonl").read_text().splitlines())}
    split_of = {Path(json.loads(x)["image"]).stem: split for split in ("train", "val", "test")
                for x in (data / f"{split}.jsonl").read_text().splitlines()}

    table = {}
    for attribute in ("color", "shape", "texture", "count"):
        table[attribute] = {}
        for k, layer in enumerate(layers):
            x: dict[str, list] = {"train": [], "val": [], "test": []}
            y: dict[str, list] = {"train": [], "val": [], "test": []}
            for stem, split in split_of.items():
                tokens, scene = feats[row[stem], k], scenes[stem]  # (N, D)
                if attribute == "count":
                    x[split].append(tokens.reshape(-1))
                    y[split].append(len(scene["dots"]))
                    continue
                for obj in scene["objects"]:
                    x[split].append(quadrant_tokens(tokens, obj["quadrant"]))
                    y[split].append(obj[attribute])
            acc, lam = ridge_accuracy({s: np.stack(v) for s, v in x.items()}, {s: np.array(v) for s, v in y.items()})
            chance = float(np.mean(np.array(y["test"]) == max(set(y["train"]), key=y["train"].count)))
            table[attribute][layer] = {"accuracy": acc, "penalty": lam, "majority": chance, "test_n": len(y["test"])}
            print(f"[probe] {attribute} layer {layer}: {acc:.3f} (majority {chance:.3f}, penalty {lam})", flush=True)
    lines = ["| attribute (probe input) | " + " | ".join(f"layer {k}" for k in layers) + " | most frequent |",
             "|---|" + "---|" * (len(layers) + 1)]
    for attribute, by in table.items():
        where = "all tokens" if attribute == "count" else "the object's quadrant"
        lines.append(f"| {attribute} ({where}, {by[layers[0]]['test_n']} test) | "
                     + " | ".join(f"{by[k]['accuracy']:.3f}" for k in layers) + f" | {by[layers[0]]['majority']:.3f} |")
    Path(args.results).write_text(json.dumps({"layers": layers, "probes": table, "table": "\n".join(lines)},
                                             indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What each vision layer knows: linear probes of the scene's attributes from one cached layer at a time.

CLI's premise is that the layer one-to-one reads (the last) is not the one that holds every kind of visual
information. This measures it on the quality benchmark's own data and cache: for every object of a synthetic
scene (``scenes.jsonl``), a ridge classifier reads the 2x2 pooled tokens of the object's quadrant in one vision
layer and predicts its colour, shape and texture; the dot count is read from all tokens of the layer. Trained
on the training images, the ridge penalty chosen on the validation images, scored on the test images. A layer
that scores far above another holds that attribute more linearly; what a frozen LLM can read through a small
projector is closer to this than to what a deep probe could dig out.

    python bench/layer_probe.py --work out/quality-powered      # after bench/quality_powered.py built its cache
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUADRANTS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}


def quadrant_tokens(tokens: np.ndarray, quadrant: str) -> np.ndarray:
    """tokens (N, D) of a square grid -> the quadrant's tokens flattened ((N/4) * D,)."""
    side = int(round(len(tokens) ** 0.5))
    grid = tokens.reshape(side, side, -1)  # (side, side, D)
    r, c = QUADRANTS[quadrant]
    h = side // 2
    return grid[r * h:(r + 1) * h, c * h:(c + 1) * h].reshape(-1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="out/quality-powered", help="bench/quality_powered.py's --work")
    ap.add_argument("--cache", default="cache-pool2", help="the feature cache under --work")
    ap.add_argument("--results", default="bench/layer-probe-results.json")
    args = ap.parse_args()

    from jobs.probe import ridge_accuracy  # the product's probe (`crosslayer probe --labels`)
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
            acc, lam, _ = ridge_accuracy({s: np.stack(v) for s, v in x.items()},
                                         {s: np.array(v) for s, v in y.items()})
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

"""Procedural image-question-answer data in LLaVA format: ``crosslayer data synth``.

Each image holds three or four large objects, one per quadrant (distinct shapes and distinct colours, some
filled with fine stripes), and a few small dark dots in the gaps. One question per image, its type chosen
round-robin so types stay balanced in every split. The questions need detail at several levels, so a model
that reads only the last vision layer is at a disadvantage:

- low:  ``texture`` (striped or plain?), ``stripes`` (horizontal / vertical / diagonal),
- mid:  ``count`` (how many small dots?), ``color``, ``shape``,
- high: ``position`` (which quadrant?), ``relation`` (what is left of / above ... the red square?).

These seven (``TYPES``) are the default and the control: the `small` base's select layer (its last) already holds
what they ask. ``SynthConfig.question_types`` opts in three more (``HEADROOM_TYPES``), about fine detail that a
ViT-style encoder loses with depth and its earlier layers keep (``bench/layer_probe.py --types`` measures it):

- ``frequency``: stripes fine, medium or coarse? (striped objects get one of three stripe periods, 50% duty
  cycle, so the three have the same mean colour; only the spatial frequency differs),
- ``arrow``: which way (up / down / left / right) does the small white arrowhead at an object's centre point?
- ``mark``: what colour is the one small square mark in the free space (one of the six object colours)?

When any of them is chosen, every image of the set carries these details (so an image does not give away its
question's type); with the default types the output is byte-for-byte what it was before they existed.

Answers are one or two lowercase words from a small closed vocabulary (``VOCABULARY``). Every answer is
recomputed from the scene description by ``answer_from_scene``, which the generator itself uses.

Output (files written to a temporary name, then renamed; ``meta.json`` last):
    DIR/images/000000.png ...        the images
    DIR/{train,val,test}.jsonl       {"id", "image", "conversations", "type", "answer", "params"}
    DIR/captions.jsonl               {"image", "caption"}, one per image
    DIR/scenes.jsonl                 {"image", "scene"}: objects (shape, color, quadrant, center, size,
                                     texture, stripes) and dots, as the generator drew them
    DIR/meta.json                    settings, types, levels, vocabulary, counts per split and type

The same seed gives the same bytes: one numpy Generator per image (seeded by (seed, index)), PIL drawing
without antialiasing, PNGs without timestamps.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cli_module.files import atomic_write

TYPES = ("color", "shape", "texture", "stripes", "count", "position", "relation")  # the default: the control
HEADROOM_TYPES = ("frequency", "arrow", "mark")                                      # opt-in: fine detail
ALL_TYPES = TYPES + HEADROOM_TYPES
TYPE_GROUPS = {"control": TYPES, "headroom": HEADROOM_TYPES, "all": ALL_TYPES}       # names --question-types takes
LEVELS = {"texture": "low", "stripes": "low", "count": "mid", "color": "mid", "shape": "mid",
          "position": "high", "relation": "high"}
HEADROOM_LEVELS = {"frequency": "low", "arrow": "low", "mark": "low"}
FREQUENCIES = ("fine", "medium", "coarse")                                           # stripe period 1x, 2x, 3x
ARROWS = ("up", "down", "left", "right")
ARROW_RGB = (255, 255, 255)
SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 190), "orange": (245, 130, 30)}
ORIENTATIONS = ("horizontal", "vertical", "diagonal")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")  # index = 2 * row + col
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}  # (d_row, d_col) to neighbour
BACKGROUND = (235, 235, 235)
DOT_RGB = (30, 30, 30)
MIN_DOTS, MAX_DOTS = 1, 6
VOCABULARY = sorted({*SHAPES, *COLORS, *ORIENTATIONS, *QUADRANTS, "striped", "plain",
                     *NUMBER_WORDS[: MAX_DOTS + 1], *(f"{c} {s}" for c in COLORS for s in SHAPES)})
HEADROOM_VOCABULARY = sorted({*FREQUENCIES, *ARROWS, *COLORS})


@dataclass
class SynthConfig:
    out: Path                # output folder (created if missing)
    n: int = 1000            # number of images, one question each
    seed: int = 0            # same seed, same bytes
    image_size: int = 224    # square images of this many pixels (the `small` base crops 224)
    val_frac: float = 0.1    # fraction of records in val.jsonl
    test_frac: float = 0.1   # fraction of records in test.jsonl
    question_types: tuple[str, ...] = TYPES  # asked round-robin in this order; any of ALL_TYPES, no repeats

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if isinstance(self.question_types, str):
            raise ValueError(f"question_types must be a sequence of type names, got the string "
                             f"{self.question_types!r}; e.g. ('color', 'frequency')")
        self.question_types = tuple(self.question_types)
        if not self.question_types:
            raise ValueError(f"question_types is empty; choose some of {ALL_TYPES}")
        unknown = [t for t in self.question_types if t not in ALL_TYPES]
        if unknown:
            raise ValueError(f"unknown question type(s) {unknown}; expected some of {ALL_TYPES}")
        repeated = sorted({t for t in self.question_types if self.question_types.count(t) > 1})
        if repeated:
            raise ValueError(f"question_types repeats {repeated}; name each type once (they are asked round-robin)")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if not 32 <= self.image_size <= 4096:
            raise ValueError(f"image_size must be in [32, 4096] pixels, got {self.image_size}")
        for name, frac in (("val_frac", self.val_frac), ("test_frac", self.test_frac)):
            if not 0.0 <= frac < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {frac}")
        if self.split_sizes()["train"] < 1:
            raise ValueError(f"val_frac {self.val_frac} + test_frac {self.test_frac} of n {self.n} leaves "
                             f"no training record")

    def split_sizes(self) -> dict[str, int]:
        n_val, n_test = round(self.n * self.val_frac), round(self.n * self.test_frac)
        return {"train": self.n - n_val - n_test, "val": n_val, "test": n_test}

    @property
    def details(self) -> bool:
        """Whether the scenes carry the headroom types' details (stripe frequency, arrows, the mark)."""
        return any(t in HEADROOM_TYPES for t in self.question_types)


def parse_question_types(text: str) -> tuple[str, ...]:
    """``--question-types``: comma-separated type names and group names (control, headroom, all), in order."""
    out: list[str] = []
    for item in (x.strip() for x in text.split(",")):
        for t in TYPE_GROUPS.get(item, (item,)):
            if t and t not in out:
                out.append(t)
    return tuple(out)


# ---------------------------------------------------------------------------------------------------- scenes

def make_scene(rng: np.random.Generator, size: int) -> dict[str, Any]:
    """Three or four objects in distinct quadrants (at least one striped and one plain), then the dots."""
    half = size // 2
    margin = max(1, size // 32)
    r_max = (half - 1) // 2 - margin                                  # largest half-extent that fits a quadrant
    r_min = max(3, round(0.6 * r_max))
    period = max(3, round(size / 40))                                 # stripe period in pixels
    k = int(rng.integers(3, 5))
    quadrants = sorted(rng.choice(4, size=k, replace=False).tolist())
    shapes = rng.choice(len(SHAPES), size=k, replace=False)
    colors = rng.choice(len(COLORS), size=k, replace=False)
    striped = rng.random(k) < 0.5
    if striped.all() or not striped.any():                            # keep both textures present
        striped[int(rng.integers(k))] = not striped[0]
    objects = []
    for i, q in enumerate(quadrants):
        r = int(rng.integers(r_min, r_max + 1))
        x0, y0 = (q % 2) * half, (q // 2) * half
        cx = int(rng.integers(x0 + r + margin, x0 + half - r - margin))
        cy = int(rng.integers(y0 + r + margin, y0 + half - r - margin))
        objects.append({"shape": SHAPES[shapes[i]], "color": list(COLORS)[colors[i]], "quadrant": QUADRANTS[q],
                        "center": [cx, cy], "size": r, "texture": "striped" if striped[i] else "plain",
                        "stripes": ORIENTATIONS[int(rng.integers(3))] if striped[i] else None})
    dots = _place_dots(rng, size, objects, int(rng.integers(MIN_DOTS, MAX_DOTS + 1)))
    return {"size": size, "background": list(BACKGROUND), "stripe_period": period,
            "stripe_width": max(1, period // 3), "objects": objects, "dots": dots}


def _place_dots(rng: np.random.Generator, size: int, objects: list[dict], want: int) -> list[dict]:
    """Rejection-sample dot centres in the free space; a dot keeps a gap from objects and other dots."""
    r = max(1, round(size / 64))
    gap = max(1, r)
    busy = np.zeros((size, size), dtype=bool)                         # (S, S): objects' pixels, then dots' boxes
    for o in objects:
        busy |= _shape_mask(o, size)
    dots: list[dict] = []
    for _ in range(200 * want):
        if len(dots) == want:
            break
        x, y = (int(v) for v in rng.integers(r + gap, size - r - gap, size=2))
        if busy[y - r - gap: y + r + gap + 1, x - r - gap: x + r + gap + 1].any():
            continue
        busy[y - r: y + r + 1, x - r: x + r + 1] = True
        dots.append({"center": [x, y], "size": r})
    return dots


def add_details(rng: np.random.Generator, scene: dict[str, Any]) -> dict[str, Any]:
    """The headroom types' details, drawn after ``make_scene``'s draws from the same generator: every striped
    object gets a stripe frequency (its own period, width half of it), every object a small arrowhead at its
    centre, the scene one small coloured square mark in the free space (clear of objects and dots)."""
    size = scene["size"]
    unit = max(2, round(size / 56))                                   # the fine period: 2 pixels at 112 px
    for o in scene["objects"]:
        if o["texture"] == "striped":
            f = int(rng.integers(len(FREQUENCIES)))
            o["frequency"] = FREQUENCIES[f]
            o["stripe_period"] = unit * (f + 1)
            o["stripe_width"] = unit * (f + 1) // 2
        o["arrow"] = ARROWS[int(rng.integers(len(ARROWS)))]
        o["arrow_size"] = max(2, round(size / 28))                    # half-extent: 4 pixels at 112 px
    half = max(1, round(size / 36))                                   # half-side: a 6-pixel square at 112 px
    busy = np.zeros((size, size), dtype=bool)                         # (S, S)
    for o in scene["objects"]:
        busy |= _shape_mask(o, size)
    for d in scene["dots"]:
        (x, y), r = d["center"], d["size"]
        busy[max(0, y - r): y + r + 1, max(0, x - r): x + r + 1] = True
    gap = max(1, half)
    for _ in range(2000):
        x, y = (int(v) for v in rng.integers(half + gap, size - half - gap, size=2))
        if not busy[y - half - gap: y + half + gap, x - half - gap: x + half + gap].any():
            break
    else:
        raise RuntimeError(f"no free space for the mark in a {size}-pixel scene; use a larger image_size")
    scene["mark"] = {"center": [x, y], "size": half, "color": list(COLORS)[int(rng.integers(len(COLORS)))],
                     "quadrant": QUADRANTS[2 * int(y >= size // 2) + int(x >= size // 2)]}
    return scene


def render(scene: dict[str, Any]) -> Image.Image:
    """Draw the scene: flat background, objects (stripes darker, never through the centre pixel), dots; with
    details also each object's own stripe period, its arrowhead, and the mark."""
    size, period, width = scene["size"], scene["stripe_period"], scene["stripe_width"]
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = scene["background"]
    yy, xx = np.mgrid[0:size, 0:size]                                  # (S, S) each
    for o in scene["objects"]:
        mask = _shape_mask(o, size)                                    # (S, S)
        rgb = np.array(COLORS[o["color"]], dtype=np.uint8)
        img[mask] = rgb
        if o["texture"] == "striped":
            p, w = o.get("stripe_period", period), o.get("stripe_width", width)
            dx, dy = xx - o["center"][0], yy - o["center"][1]
            u = {"horizontal": dy, "vertical": dx, "diagonal": dx + dy}[o["stripes"]]
            stripe = mask & (np.mod(u, p) >= p - w)                   # u = 0 (the centre) is never a stripe
            img[stripe] = (rgb * 0.4).astype(np.uint8)
    out = Image.fromarray(img)
    draw = ImageDraw.Draw(out)
    for o in scene["objects"]:
        if "arrow" in o:
            draw.polygon(_arrow_points(o["arrow"], *o["center"], o["arrow_size"]), fill=ARROW_RGB)
    for d in scene["dots"]:
        (x, y), r = d["center"], d["size"]
        draw.ellipse([x - r, y - r, x + r, y + r], fill=DOT_RGB)
    if "mark" in scene:
        (x, y), h = scene["mark"]["center"], scene["mark"]["size"]
        draw.rectangle([x - h, y - h, x + h - 1, y + h - 1], fill=COLORS[scene["mark"]["color"]])
    return out


def _arrow_points(direction: str, cx: int, cy: int, r: int) -> list[tuple[int, int]]:
    """An isosceles arrowhead (triangle) of half-extent r centred on (cx, cy), its tip towards ``direction``."""
    return {"up": [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)],
            "down": [(cx, cy + r), (cx - r, cy - r), (cx + r, cy - r)],
            "left": [(cx - r, cy), (cx + r, cy - r), (cx + r, cy + r)],
            "right": [(cx + r, cy), (cx - r, cy - r), (cx - r, cy + r)]}[direction]


def _shape_mask(obj: dict[str, Any], size: int) -> np.ndarray:
    mask = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(mask), obj["shape"], *obj["center"], obj["size"])
    return np.asarray(mask) > 0


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def caption(scene: dict[str, Any]) -> str:
    parts = []
    for o in scene["objects"]:
        if o["texture"] == "striped":
            fine = f"{o['frequency']} " if "frequency" in o else ""
            thing = f"{o['color']} {o['shape']} with {fine}{o['stripes']} stripes"
        else:
            thing = f"plain {o['color']} {o['shape']}"
        if "arrow" in o:
            thing += f" marked with a small arrow pointing {o['arrow']}"
        parts.append(f"{'an' if thing[0] in 'aeiou' else 'a'} {thing} in the {o['quadrant']}")
    n = len(scene["dots"])
    dots = f"{NUMBER_WORDS[n]} small dot{'s' if n != 1 else ''}"
    mark = f" and a small {scene['mark']['color']} square mark" if "mark" in scene else ""
    return f"{', '.join(parts[:-1])} and {parts[-1]}, with {dots}{mark}."


# ------------------------------------------------------------------------------------------------- questions

def _find(scene: dict[str, Any], **want: str) -> dict[str, Any]:
    hits = [o for o in scene["objects"] if all(o[k] == v for k, v in want.items())]
    if len(hits) != 1:
        raise ValueError(f"{want} matches {len(hits)} objects, expected 1")
    return hits[0]


def _neighbour(scene: dict[str, Any], ref: dict[str, Any], direction: str) -> dict[str, Any] | None:
    q = QUADRANTS.index(ref["quadrant"])
    row, col = q // 2 + DIRECTIONS[direction][0], q % 2 + DIRECTIONS[direction][1]
    if not (0 <= row < 2 and 0 <= col < 2):
        return None
    return next((o for o in scene["objects"] if o["quadrant"] == QUADRANTS[2 * row + col]), None)


def answer_from_scene(scene: dict[str, Any], qtype: str, params: dict[str, Any]) -> str:
    """The answer to a question of type ``qtype`` with ``params``, read off the scene description."""
    if qtype == "color":
        return _find(scene, shape=params["shape"])["color"]
    if qtype == "shape":
        return _find(scene, color=params["color"])["shape"]
    if qtype == "texture":
        return _find(scene, shape=params["shape"])["texture"]
    if qtype == "stripes":
        o = _find(scene, shape=params["shape"])
        if o["stripes"] is None:
            raise ValueError(f"the {o['shape']} is plain; a stripes question needs a striped object")
        return o["stripes"]
    if qtype == "count":
        return NUMBER_WORDS[len(scene["dots"])]
    if qtype == "position":
        return _find(scene, shape=params["shape"])["quadrant"]
    if qtype == "relation":
        other = _neighbour(scene, _find(scene, shape=params["shape"]), params["direction"])
        if other is None:
            raise ValueError(f"nothing {params['direction']} the {params['shape']}")
        return f"{other['color']} {other['shape']}"
    if qtype in HEADROOM_TYPES and "mark" not in scene:
        raise ValueError(f"a {qtype} question needs a scene with details (add_details); this one has none")
    if qtype == "frequency":
        o = _find(scene, shape=params["shape"])
        if o["texture"] != "striped":
            raise ValueError(f"the {o['shape']} is plain; a frequency question needs a striped object")
        return o["frequency"]
    if qtype == "arrow":
        return _find(scene, shape=params["shape"])["arrow"]
    if qtype == "mark":
        return scene["mark"]["color"]
    raise ValueError(f"unknown question type {qtype!r}; expected one of {ALL_TYPES}")


def make_question(rng: np.random.Generator, scene: dict[str, Any], qtype: str) -> tuple[str, dict[str, Any]]:
    """-> (question text, params) for one question of ``qtype`` about ``scene``."""
    objects = scene["objects"]

    def pick(pool: list[dict]) -> dict:
        return pool[int(rng.integers(len(pool)))]

    if qtype == "color":
        o = pick(objects)
        return f"What color is the {o['shape']}?", {"shape": o["shape"]}
    if qtype == "shape":
        o = pick(objects)
        return f"What shape is the {o['color']} object?", {"color": o["color"]}
    if qtype == "texture":
        texture = ("striped", "plain")[int(rng.integers(2))]              # balance the two answers
        o = pick([o for o in objects if o["texture"] == texture])
        return f"Is the {o['shape']} striped or plain?", {"shape": o["shape"]}
    if qtype == "stripes":
        o = pick([o for o in objects if o["texture"] == "striped"])
        return f"What is the stripe orientation of the {o['shape']}?", {"shape": o["shape"]}
    if qtype == "count":
        return "How many small dots are there?", {}
    if qtype == "position":
        o = pick(objects)
        return f"Which quadrant holds the {o['shape']}?", {"shape": o["shape"]}
    if qtype == "relation":
        pairs = [(o, d) for o in objects for d in DIRECTIONS if _neighbour(scene, o, d) is not None]
        o, d = pairs[int(rng.integers(len(pairs)))]
        where = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}[d]
        return f"What is {where} the {o['color']} {o['shape']}?", {"shape": o["shape"], "direction": d}
    if qtype in HEADROOM_TYPES and "mark" not in scene:
        raise ValueError(f"a {qtype} question needs a scene with details (add_details); this one has none")
    if qtype == "frequency":                                          # each object's frequency is uniform
        o = pick([o for o in objects if o["texture"] == "striped"])
        return f"Are the stripes on the {o['shape']} fine, medium or coarse?", {"shape": o["shape"]}
    if qtype == "arrow":
        o = pick(objects)
        return f"Which way does the small arrow on the {o['shape']} point?", {"shape": o["shape"]}
    if qtype == "mark":
        return "What color is the small square mark?", {}
    raise ValueError(f"unknown question type {qtype!r}; expected one of {ALL_TYPES}")


# ---------------------------------------------------------------------------------------------------- writing

def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()


def synthesize(cfg: SynthConfig) -> dict[str, Any]:
    """Generate the whole set into ``cfg.out``; returns the contents of meta.json."""
    (cfg.out / "images").mkdir(parents=True, exist_ok=True)
    sizes = cfg.split_sizes()
    bounds = {"train": (0, sizes["train"]), "val": (sizes["train"], sizes["train"] + sizes["val"]),
              "test": (sizes["train"] + sizes["val"], cfg.n)}
    records, captions, scenes = [], [], []
    for i in range(cfg.n):
        rng = np.random.default_rng([cfg.seed, i])
        scene = make_scene(rng, cfg.image_size)
        if cfg.details:
            add_details(rng, scene)
        qtype = cfg.question_types[i % len(cfg.question_types)]       # round-robin: balanced in every split
        question, params = make_question(rng, scene, qtype)
        answer = answer_from_scene(scene, qtype, params)
        image = f"images/{i:06d}.png"
        buf = io.BytesIO()
        render(scene).save(buf, format="PNG")
        atomic_write(cfg.out / image, buf.getvalue())
        records.append({"id": f"synth-{i:06d}", "image": image, "type": qtype, "answer": answer, "params": params,
                        "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                          {"from": "gpt", "value": answer}]})
        captions.append({"image": image, "caption": caption(scene)})
        scenes.append({"image": image, "scene": scene})
    counts = {}
    for split, (lo, hi) in bounds.items():
        atomic_write(cfg.out / f"{split}.jsonl", _jsonl(records[lo:hi]))
        per_type = Counter(r["type"] for r in records[lo:hi])
        counts[split] = {"total": hi - lo, "per_type": {t: per_type.get(t, 0) for t in cfg.question_types}}
    for stale in (cfg.out / "images").glob("[0-9]*.png"):            # left by an earlier, larger run
        if stale.stem.isdigit() and int(stale.stem) >= cfg.n:
            stale.unlink()
    atomic_write(cfg.out / "captions.jsonl", _jsonl(captions))
    atomic_write(cfg.out / "scenes.jsonl", _jsonl(scenes))
    levels = {**LEVELS, **HEADROOM_LEVELS}
    meta = {"n": cfg.n, "seed": cfg.seed, "image_size": cfg.image_size, "val_frac": cfg.val_frac,
            "test_frac": cfg.test_frac, "types": list(cfg.question_types),
            "levels": {t: levels[t] for t in cfg.question_types} if cfg.details else LEVELS,
            "vocabulary": sorted({*VOCABULARY, *HEADROOM_VOCABULARY}) if cfg.details else VOCABULARY,
            "counts": counts}
    if cfg.details:
        meta["details"] = True
    atomic_write(cfg.out / "meta.json", (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return meta


# ------------------------------------------------------------------------------------------------------- CLI

def cmd_synth(args: argparse.Namespace) -> int:
    cfg = SynthConfig(out=Path(args.out), n=args.n, seed=args.seed, image_size=args.image_size,
                      val_frac=args.val_frac, test_frac=args.test_frac,
                      question_types=parse_question_types(args.question_types))
    start = time.perf_counter()
    meta = synthesize(cfg)
    summary = {"out": str(cfg.out), "seconds": round(time.perf_counter() - start, 2),
               **{split: c["total"] for split, c in meta["counts"].items()}}
    print(json.dumps(summary), file=sys.stdout)
    return 0


def data_subcommands(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The nested subparsers of ``crosslayer data``, created on first use; other data tools add theirs here."""
    if "data" not in subparsers.choices:
        parser = subparsers.add_parser("data", help="make and inspect data sets")
        parser.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    parser = subparsers.choices["data"]
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = data_subcommands(subparsers).add_parser(
        "synth", help="procedural image-question-answer set (LLaVA format) with low-, mid- and high-level questions")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=1000, help="number of images (one question each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=224, help="image side in pixels")
    p.add_argument("--val-frac", type=float, default=0.1)
    p.add_argument("--test-frac", type=float, default=0.1)
    p.add_argument("--question-types", default="control",
                   help=f"comma-separated question types, asked round-robin in this order; names from "
                        f"{', '.join(ALL_TYPES)}, or the groups control (the default seven), headroom "
                        f"({', '.join(HEADROOM_TYPES)}: fine detail the last vision layer loses) and all")
    p.set_defaults(func=cmd_synth)

"""`crosslayer probe`: does my data hold anything in the other vision layers that the select layer lacks?

Reads a feature cache (``crosslayer features``), a sample of its images by default, as a Ray Data job. Images are
split by a hash of their id: 60% fit, 20% choose the ridge penalty, 20% held out for the numbers reported.

- **Label-free** (always): for each cached vision layer k, a ridge map W_k from the select layer's token (the layer
  one-to-one feeds the LLM, pooled as the cache pools the layers) to layer k's token at the same position,
  shared by all positions: y = [x ; 1] W_k, x, y (Dv,). Fitted from sufficient statistics (X^T X, X^T Y summed
  over the fit images by Ray tasks), scored on held-out images as 1 - R^2 = sum ||y - y_hat||^2 / sum ||y -
  mean_fit(y)||^2: the share of layer k the select layer cannot predict linearly (0: nothing new; the select
  layer itself scores ~0). A 95% interval resamples held-out images (``jobs.intervals``-style percentile
  bootstrap). High 1 - R^2 says a layer differs, not that the difference is useful: that is what labels show.
- **Supervised** (``labels``: LLaVA-format records with an image and an ``answer`` / last reply, grouped by
  ``type``): per question type and layer, a ridge classifier (``ridge_predict``) on the layer's tokens averaged
  to a ``grid`` x ``grid`` grid, its held-out accuracy with a 95% interval (what ``bench/layer_probe.py`` runs on
  the synthetic scenes' objects).
- **Suggestion** for ``cli.vision_layers`` (``suggest``): the select layer plus, with labels, the layers whose
  probe beats the select layer's (paired 95% interval over the same held-out questions above 0); otherwise the
  layers the select layer predicts worst.

Output: a table on stdout, ``--out`` JSON, and a PNG (``--png``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines import storage

PENALTIES = (1e-3, 1e-2, 0.1, 1.0, 10.0)  # ridge penalty per training example (features standardised)
SPLITS = ("fit", "val", "test")


@dataclass
class ProbeJob:
    """Arguments of `crosslayer probe`."""

    cache: str  # feature cache folder or s3:// prefix
    sample: int = 2000  # images read from the cache (a random sample); 0: all of them
    labels: str | None = None  # LLaVA-format records (JSON / JSONL) with image + answer (+ type): supervised probes
    image_root: str | None = None  # folder of the labels' relative image paths (default: the labels file's)
    grid: int = 2  # supervised probes read each layer's tokens averaged to grid x grid
    seed: int = 0  # sampling and bootstrap seed
    suggest: int = 4  # at most this many vision layers in the suggestion
    out: str | None = None  # report JSON
    png: str | None = None  # figure

    def __post_init__(self) -> None:
        if self.sample < 0:
            raise ValueError(f"sample ({self.sample}) must be >= 0 (0 reads the whole cache)")
        if self.grid < 1:
            raise ValueError(f"grid ({self.grid}) must be >= 1")
        if self.suggest < 1:
            raise ValueError(f"suggest ({self.suggest}) must be >= 1")


def split_of(image_id: str) -> str:
    """fit / val / test, 60 / 20 / 20 by a hash of the image id: stable across runs and caches."""
    h = int(hashlib.sha256(str(image_id).encode()).hexdigest()[:8], 16) % 10
    return "fit" if h < 6 else ("val" if h < 8 else "test")


def pool_grid(tokens: np.ndarray, side: int) -> np.ndarray:
    """tokens (B, N, D) of a square grid -> (B, side * side, D): averaged over equal blocks (side must divide)."""
    b, n, d = tokens.shape
    g = int(round(n ** 0.5))
    if g * g != n or g % side:
        raise ValueError(f"{n} tokens are not a square grid divisible by {side}")
    x = tokens.reshape(b, side, g // side, side, g // side, d)
    return x.mean(axis=(2, 4)).reshape(b, side * side, d)


# --- label-free: ridge map select -> layer k --------------------------------------------------------------------

class Stats:
    """Ray Data batch function: per split, X^T X and X^T Y_k over tokens (X = [select ; 1]), and Y_k's sums."""

    def __init__(self, dtype: str, pool: int):
        self.dtype, self.pool = dtype, pool

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x, y = tokens_of(batch, self.dtype, self.pool)  # (B, N, D), (B, K, N, D)
        splits = [split_of(i) for i in batch["image_id"]]
        k, d = y.shape[1], y.shape[-1]
        out: dict[str, list] = {"split": [], "xx": [], "xy": [], "ysum": [], "yy": [], "count": [], "images": []}
        for s in ("fit", "val"):
            rows = [i for i, t in enumerate(splits) if t == s]
            if not rows:
                continue
            xs = augment(x[rows].reshape(-1, d))  # (T, D + 1)
            ys = y[rows].transpose(1, 0, 2, 3).reshape(k, -1, d)  # (K, T, D)
            out["split"].append(s)
            out["xx"].append(xs.T @ xs)  # (D + 1, D + 1)
            out["xy"].append(np.einsum("tf,ktd->kfd", xs, ys))  # (K, D + 1, D)
            out["ysum"].append(ys.sum(1))  # (K, D)
            out["yy"].append((ys * ys).sum((1, 2)))  # (K,)
            out["count"].append(xs.shape[0])
            out["images"].append(len(rows))
        shapes = {"xx": (d + 1, d + 1), "xy": (k, d + 1, d), "ysum": (k, d), "yy": (k,)}
        return {"split": np.array(out["split"], dtype=object), "count": np.array(out["count"], dtype=np.int64),
                "images": np.array(out["images"], dtype=np.int64),
                **{n: np.stack(out[n]) if out[n] else np.zeros((0, *shape)) for n, shape in shapes.items()}}


class Residuals:
    """Ray Data batch function on held-out images: per image and layer, the ridge map's squared error and the
    squared deviation from the fit images' mean (1 - R^2's numerator and denominator)."""

    def __init__(self, dtype: str, pool: int, weights: np.ndarray, mean: np.ndarray):
        self.dtype, self.pool, self.w, self.mean = dtype, pool, weights, mean  # (K, D + 1, D), (K, D)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x, y = tokens_of(batch, self.dtype, self.pool)  # (B, N, D), (B, K, N, D)
        pred = np.einsum("bnf,kfd->bknd", augment(x), self.w)  # (B, K, N, D)
        sse = ((y - pred) ** 2).sum((2, 3))  # (B, K)
        sst = ((y - self.mean[None, :, None, :]) ** 2).sum((2, 3))  # (B, K)
        return {"sse": sse, "sst": sst}


def augment(x: np.ndarray) -> np.ndarray:
    """(..., D) -> (..., D + 1) with a trailing 1 (the intercept)."""
    return np.concatenate([x, np.ones((*x.shape[:-1], 1), dtype=x.dtype)], axis=-1)


def tokens_of(batch: dict[str, np.ndarray], dtype: str, pool: int) -> tuple[np.ndarray, np.ndarray]:
    """Cache rows -> the select layer's tokens pooled like the layers (B, N', D) and the layers (B, K, N', D)."""
    import torch

    from cli_module.amp import pool_tokens
    from pipelines.feature_cache import batch_to_features

    f = batch_to_features(batch, dtype)
    select = pool_tokens(f.select_features[:, None], pool)[:, 0]  # (B, N', D)
    return select.double().numpy(), torch.as_tensor(f.layers).double().numpy()


def solve_ridge(xx: np.ndarray, xy: np.ndarray, lam: float) -> np.ndarray:
    """argmin ||Y - X W||^2 + lam * n * ||W||^2 (the intercept unpenalised), from X^T X (F, F), X^T Y (K, F, D)."""
    n = xx[-1, -1]  # the ones column's square: the token count
    scale = np.diag(xx)[:-1].mean() / max(n, 1)  # penalty relative to the features' mean square
    reg = np.eye(len(xx)) * lam * n * scale
    reg[-1, -1] = 0.0
    return np.stack([np.linalg.solve(xx + reg, b) for b in xy])  # (K, F, D)


def held_out_error(xx: np.ndarray, xy: np.ndarray, yy: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum ||Y - X W||^2 per layer from a split's statistics: Y^T Y - 2 tr(W^T X^T Y) + tr(W^T X^T X W) (K,)."""
    return yy - 2 * np.einsum("kfd,kfd->k", w, xy) + np.einsum("kfd,fg,kgd->k", w, xx, w)


def ratio_interval(sse: np.ndarray, sst: np.ndarray, seed: int, n_boot: int = 2000) -> tuple[float, float, float]:
    """sum(sse) / sum(sst) over images with a 95% percentile bootstrap over images."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sse), size=(n_boot, len(sse)))
    boots = sse[idx].sum(1) / sst[idx].sum(1)
    return float(sse.sum() / sst.sum()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


# --- supervised probes -------------------------------------------------------------------------------------------

def ridge_accuracy(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> tuple[float, float]:
    """One-vs-rest ridge classifier on standardised features: (test accuracy, the penalty chosen on val)."""
    acc, lam, _ = ridge_predict(x, y)
    return acc, lam


def ridge_predict(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> tuple[float, float, np.ndarray]:
    """``ridge_accuracy`` plus the per-test-row correctness (bool (n_test,)); splits train (or fit) / val / test,
    the penalty chosen on val. With fewer training rows than features it solves the same ridge in its dual form
    (n x n instead of F x F): the same weights, faster."""
    train = "train" if "train" in x else "fit"
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    xs = {k: (v - mean) / std for k, v in x.items()}
    classes = np.unique(y[train])
    onehot = (y[train][:, None] == classes[None, :]).astype(np.float64)  # (n, C)
    n, f = xs[train].shape
    dual = n < f
    gram = xs[train] @ xs[train].T if dual else xs[train].T @ xs[train]  # (n, n) or (F, F)
    best = (-1.0, 0.0, np.zeros(0, dtype=bool))
    for lam in PENALTIES:
        ridge = gram + lam * n * np.eye(len(gram))
        w = xs[train].T @ np.linalg.solve(ridge, onehot) if dual else np.linalg.solve(ridge, xs[train].T @ onehot)
        val = float((classes[(xs["val"] @ w).argmax(1)] == y["val"]).mean())  # w: (F, C)
        if val > best[0]:
            best = (val, lam, classes[(xs["test"] @ w).argmax(1)] == y["test"])
    return float(best[2].mean()), best[1], best[2]


def read_labels(path: str, image_root: str | None) -> list[dict[str, str]]:
    """LLaVA-format records -> [{image (absolute), type, answer}]: ``answer`` or the last gpt reply."""
    text = storage.read_bytes(path).decode()
    records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
    root = image_root or os.path.dirname(os.path.abspath(path))
    out = []
    for r in records:
        if not r.get("image"):
            continue
        answer = r.get("answer")
        if answer is None:
            replies = [c["value"] for c in r.get("conversations", []) if c.get("from") in ("gpt", "assistant")]
            answer = replies[-1] if replies else None
        if answer is None:
            raise ValueError(f"{path}: record {r.get('id')!r} has no 'answer' and no reply to probe for")
        image = r["image"] if r["image"].startswith(("/", "s3://")) else os.path.join(root, r["image"])
        out.append({"image": storage.image_key(image),
                    "type": str(r.get("type") or "all"), "answer": str(answer).strip().lower()})
    if not out:
        raise ValueError(f"{path}: no records with an image to probe")
    return out


def supervised(rows: dict[str, np.ndarray], labels: list[dict[str, str]], layers: list[int], dtype: str,
               grid: int, seed: int, select: int, pool: int) -> dict[str, dict[int, dict[str, float]]]:
    """Per question type and layer: held-out accuracy of a ridge classifier with its interval, and the most
    frequent answer's accuracy. ``rows``: the cache rows (numpy) of the labelled images. The select layer is
    probed too (from the cache's ``select`` column, pooled like the layers) when it is not among ``layers``."""
    from cli_module.amp import pool_tokens
    from pipelines.feature_cache import decode_column

    from .intervals import accuracy_interval, paired_difference

    by_source = {storage.image_key(str(s)): i for i, s in enumerate(rows["source"])}
    missing = [lab["image"] for lab in labels if lab["image"] not in by_source]
    if missing:
        raise ValueError(f"{len(missing)} labelled image(s) are not in the cache (first: {missing[:2]}); cache them "
                         f"with `crosslayer features` (same paths), or fix --image-root")
    feats = decode_column(rows, "layers", dtype).numpy()  # (R, K, N', D)
    if select not in layers:
        sel = pool_tokens(decode_column(rows, "select", dtype)[:, None], pool).numpy()  # (R, 1, N', D)
        feats, layers = np.concatenate([feats, sel], axis=1), [*layers, select]
    pooled = np.stack([pool_grid(feats[:, k], grid).reshape(len(feats), -1) for k in range(len(layers))], 1)
    out: dict[str, dict[int, dict[str, float]]] = {}
    for qtype in sorted({lab["type"] for lab in labels}):
        mine = [lab for lab in labels if lab["type"] == qtype]
        idx = np.array([by_source[lab["image"]] for lab in mine])
        split = np.array([split_of(str(rows["image_id"][i])) for i in idx])
        answers = np.array([lab["answer"] for lab in mine])
        if min((split == s).sum() for s in SPLITS) < 2 or len(set(answers[split == "fit"])) < 2:
            continue  # too few examples of this type for a held-out probe
        out[qtype], correct_of = {}, {}
        for k, layer in enumerate(layers):
            acc, lam, hits = ridge_predict({s: pooled[idx[split == s], k] for s in SPLITS},
                                           {s: answers[split == s] for s in SPLITS})
            correct = hits.astype(np.float64)
            ci = accuracy_interval(correct, seed=seed)
            fit = list(answers[split == "fit"])
            majority = float(np.mean(answers[split == "test"] == max(sorted(set(fit)), key=fit.count)))  # ties: first by name
            out[qtype][layer] = {"accuracy": acc, "low": ci.low, "high": ci.high, "penalty": lam,
                                 "majority": majority, "test_n": int((split == "test").sum())}
            correct_of[layer] = correct
        for layer, entry in out[qtype].items():  # paired: the same held-out questions for both layers
            d = paired_difference(correct_of[layer], correct_of[select], seed=seed)
            entry["vs_select"] = {"change": d.estimate, "low": d.low, "high": d.high}
    return out


# --- the job ---------------------------------------------------------------------------------------------------

def run_probe(job: ProbeJob) -> dict[str, Any]:
    import ray

    from pipelines.feature_cache import per_image_shapes, read_cache, read_cache_info, table_to_numpy

    info = read_cache_info(job.cache)
    if per_image_shapes(job.cache):
        raise ValueError(f"{job.cache}: its rows have their own token counts (a Qwen base's cache); the probe reads "
                         f"caches of one shape per image (LLaVA-style bases) and does not support these yet")
    key = info["key"]
    layers, select, pool, dtype = list(key["layers"]), int(key["select_layer"]), int(key["pool"]), key["dtype"]
    ds = read_cache(job.cache)
    total = int(info.get("rows") or ds.count())
    if job.sample and total > job.sample:
        ds = ds.random_sample(job.sample / total, seed=job.seed)
    ds = ds.materialize()
    stats = ds.map_batches(Stats, fn_constructor_kwargs={"dtype": dtype, "pool": pool}, batch_size=32,
                           batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1)).take_all()
    agg: dict[str, dict[str, Any]] = {}
    for r in stats:
        s = str(r["split"])
        a = agg.setdefault(s, {"xx": 0.0, "xy": 0.0, "ysum": 0.0, "yy": 0.0, "count": 0, "images": 0})
        for name in ("xx", "xy", "ysum", "yy", "count", "images"):
            a[name] = a[name] + r[name]
    if set(agg) != {"fit", "val"}:
        raise ValueError(f"the cache sample has no images in split(s) {sorted({'fit', 'val'} - set(agg))}: "
                         f"probe needs at least ~20 images (--sample)")
    fit, val = agg["fit"], agg["val"]
    errors = {lam: held_out_error(val["xx"], val["xy"], val["yy"], solve_ridge(fit["xx"], fit["xy"], lam)).sum()
              for lam in PENALTIES}
    lam = min(errors, key=errors.get)
    w = solve_ridge(fit["xx"], fit["xy"], lam)
    mean = fit["ysum"] / fit["count"]  # (K, D)
    test = ds.filter(lambda row: split_of(str(row["image_id"])) == "test")
    res = test.map_batches(Residuals, fn_constructor_kwargs={"dtype": dtype, "pool": pool, "weights": w, "mean": mean},
                           batch_size=32, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1)).take_all()
    if not res:
        raise ValueError("the cache sample has no held-out images: probe needs at least ~20 images (--sample)")
    sse, sst = np.stack([r["sse"] for r in res]), np.stack([r["sst"] for r in res])  # (images, K)
    unexplained = {}
    for k, layer in enumerate(layers):
        est, low, high = ratio_interval(sse[:, k], sst[:, k], job.seed)
        unexplained[layer] = {"unexplained": est, "low": low, "high": high}
    report: dict[str, Any] = {"cache": job.cache, "select_layer": select, "layers": layers, "pool": pool,
                              "images": {"fit": int(fit["images"]), "val": int(val["images"]), "test": len(res)},
                              "penalty": lam, "unexplained": unexplained}
    if job.labels:
        labels = read_labels(job.labels, job.image_root)
        wanted = {lab["image"] for lab in labels}
        from pipelines.feature_cache import load_cache_table

        table = load_cache_table(job.cache)
        keep = [i for i, s in enumerate(table["source"].to_pylist())
                if storage.image_key(s) in wanted]
        rows = table_to_numpy(table.take(keep))
        report["supervised"] = supervised(rows, labels, layers, dtype, job.grid, job.seed, select, pool)
    report["suggestion"], report["suggestion_basis"] = suggest(report, job.suggest)
    if job.out:
        storage.write_json(job.out, report)
    if job.png:
        draw(report, job.png)
    return report


def suggest(report: dict[str, Any], at_most: int) -> tuple[list[int], str]:
    """``cli.vision_layers`` and why: the select layer plus, with labels, the layers whose probe beats the select
    layer's on some question type with a paired 95% interval above 0 (largest gains first); without labels, or
    when no layer clears that bar, the layers the select layer predicts worst (highest 1 - R^2)."""
    select = report["select_layer"]
    gains: dict[int, float] = {}
    for by in (report.get("supervised") or {}).values():
        for k, v in by.items():
            if k != select and v["vs_select"]["low"] > 0:
                gains[k] = max(gains.get(k, 0.0), v["vs_select"]["change"])
    if gains:
        chosen, why = sorted(gains, key=gains.get, reverse=True), "probes above the select layer's, paired 95% CI > 0"
    else:
        un = report["unexplained"]
        chosen = sorted((k for k in un if k != select), key=lambda k: un[k]["unexplained"], reverse=True)
        why = ("highest 1 - R^2 (no layer's probe beat the select layer's, paired 95% CI)"
               if report.get("supervised") else "highest 1 - R^2 (label-free)")
    return sorted(dict.fromkeys([select, *chosen][:at_most])), why


def format_probe(report: dict[str, Any]) -> str:
    layers, select = report["layers"], report["select_layer"]
    lines = [f"1 - R^2 of a ridge map from the select layer ({select}) to each layer, on "
             f"{report['images']['test']} held-out images (95% CI):", "",
             "| vision layer | " + " | ".join(str(k) for k in layers) + " |", "|---|" + "---|" * len(layers),
             "| 1 - R^2 | " + " | ".join(f"{report['unexplained'][k]['unexplained']:.3f} "
                                       f"[{report['unexplained'][k]['low']:.3f}, {report['unexplained'][k]['high']:.3f}]"
                                       for k in layers) + " |", ""]
    sup = report.get("supervised")
    if sup:
        lines += ["linear probe accuracy per question type (held-out, 95% CI):", "",
                  "| question type (test n) | " + " | ".join(f"layer {k}" for k in layers) + " | most frequent |",
                  "|---|" + "---|" * (len(layers) + 1)]
        for qtype, by in sup.items():
            first = next(iter(by.values()))
            lines.append(f"| {qtype} ({first['test_n']}) | " + " | ".join(
                f"{by[k]['accuracy']:.2f} [{by[k]['low']:.2f}, {by[k]['high']:.2f}]" if k in by else "-"
                for k in layers)
                + f" | {first['majority']:.2f} |")
        lines.append("")
    lines.append(f"suggested cli.vision_layers: {report['suggestion']} ({report['suggestion_basis']})")
    return "\n".join(lines)


def draw(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    sup = report.get("supervised") or {}
    fig, axes = plt.subplots(1, 2 if sup else 1, figsize=(11 if sup else 5.5, 3.6), squeeze=False)
    ax = axes[0, 0]
    un = report["unexplained"]
    est = np.array([un[k]["unexplained"] for k in layers])
    err = np.array([[est[i] - un[k]["low"], un[k]["high"] - est[i]] for i, k in enumerate(layers)]).T
    ax.bar([str(k) for k in layers], est, yerr=err, color=["#999" if k == report["select_layer"] else "#3a7"
                                                           for k in layers], capsize=3)
    ax.set_xlabel("vision layer (grey: the select layer)")
    ax.set_ylabel("1 - R^2 from the select layer")
    ax.set_title("what the select layer cannot predict")
    if sup:
        ax = axes[0, 1]
        for qtype, by in sup.items():
            ks = sorted(by)
            ax.plot([str(k) for k in ks], [by[k]["accuracy"] for k in ks], marker="o", label=qtype)
        ax.set_xlabel("vision layer")
        ax.set_ylabel("held-out probe accuracy")
        ax.set_title("linear probes per question type")
        ax.legend(fontsize=7)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.write_atomic(path, buf.getvalue())


# --- command line ----------------------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="does the feature cache hold anything in other vision layers that the select "
                                     "layer lacks? (label-free ridge maps; linear probes with --labels)")
    p.add_argument("cache", help="feature cache (crosslayer features --out)")
    p.add_argument("--sample", type=int, default=2000, help="images sampled from the cache (0: all)")
    p.add_argument("--labels", help="LLaVA-format records (image + answer, grouped by type): supervised probes")
    p.add_argument("--image-root", help="folder of the labels' relative image paths (default: the labels file's)")
    p.add_argument("--grid", type=int, default=2, help="supervised probes read each layer averaged to grid x grid")
    p.add_argument("--suggest", type=int, default=4, help="at most this many layers in the suggestion")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="report JSON")
    p.add_argument("--png", default="probe.png", help="figure (default probe.png)")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    report = run_probe(ProbeJob(cache=args.cache, sample=args.sample, labels=args.labels, image_root=args.image_root,
                                grid=args.grid, seed=args.seed, suggest=args.suggest, out=args.out, png=args.png))
    print(format_probe(report))
    print(f"probe: figure {args.png}" + (f", report {args.out}" if args.out else ""))
    return 0

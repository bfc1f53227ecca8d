"""Gate heatmaps: draw the AGF gate tensor (generated token x injection layer x vision layer) as a PNG.

``draw_gates`` is the reusable drawing function (one panel per injection layer, tokens down, vision layers
across, one shared 0..1 colorbar), so any command holding a (T, L, K) array can call it. ``crosslayer gates
INPUT.json --out heatmap.png`` reads either a chat completion returned with ``"return_gates": true`` (its
``gates`` object) or that object on its own: ``{"values": (T, L, K) nested lists, "inject_layers": [...],
"vision_layers": [...], "tokens": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

MAX_TOKEN_LABELS = 48  # above this many generated tokens, rows are numbered instead of labelled by text


def draw_gates(gates: np.ndarray, out: Path, inject_layers: list[int], vision_layers: list[int],
               tokens: list[str] | None = None, title: str | None = None) -> Path:
    """gates (T, L, K) in [0, 1] -> PNG at ``out``: panel l shows decoder layer inject_layers[l] (T x K)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gates = np.asarray(gates, dtype=np.float32)
    if gates.ndim != 3:
        raise ValueError(f"gates must have shape (tokens, inject layers, vision layers), got {gates.shape}")
    t, n_layers, k = gates.shape
    if t == 0:
        raise ValueError("gates hold no generated token; nothing to draw")
    if len(inject_layers) != n_layers or len(vision_layers) != k:
        raise ValueError(f"gates have {n_layers} injection and {k} vision layers, but inject_layers has "
                         f"{len(inject_layers)} and vision_layers {len(vision_layers)}")
    if tokens is not None and len(tokens) != t:
        raise ValueError(f"tokens has {len(tokens)} labels for {t} generated tokens")
    height = min(2.0 + 0.22 * t, 30.0)
    fig, axes = plt.subplots(1, n_layers, figsize=(1.2 + 0.55 * k * n_layers + 1.4 * n_layers, height),
                             squeeze=False, sharey=True, constrained_layout=True)
    image = None
    for panel, ax in enumerate(axes[0]):
        image = ax.imshow(gates[:, panel, :], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                          interpolation="nearest")
        ax.set_title(f"decoder layer {inject_layers[panel]}")
        ax.set_xticks(range(k), [str(v) for v in vision_layers])
        ax.set_xlabel("vision layer (hidden_states index)")
    labels = [_label(s) for s in tokens] if tokens is not None and t <= MAX_TOKEN_LABELS else None
    if labels:
        axes[0][0].set_yticks(range(t), labels)
    axes[0][0].set_ylabel("generated token")
    fig.colorbar(image, ax=axes[0].tolist(), label="gate g_k (sigmoid)")
    fig.suptitle(title or "AGF gates per generated token, injection layer and vision layer")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _label(token: str) -> str:
    """A printable, short tick label for one decoded token."""
    text = repr(token)[1:-1]
    return text if len(text) <= 14 else text[:13] + "…"


def load_gates(data: dict) -> tuple[np.ndarray, list[int], list[int], list[str] | None]:
    """A chat completion holding ``gates`` (or the gates object itself) -> (values, inject, vision, tokens)."""
    summary = data.get("gates", data) if isinstance(data, dict) else None
    if not isinstance(summary, dict) or "values" not in summary:
        raise ValueError("no gates found: pass a chat completion made with \"return_gates\": true, or its "
                         "\"gates\" object ({\"values\", \"inject_layers\", \"vision_layers\"})")
    values = np.asarray(summary["values"], dtype=np.float32)
    if values.ndim != 3:
        raise ValueError(f"gates.values must be (tokens, inject layers, vision layers), got shape {values.shape}")
    inject = list(summary.get("inject_layers") or range(values.shape[1]))
    vision = list(summary.get("vision_layers") or range(values.shape[2]))
    return values, inject, vision, summary.get("tokens")


def cmd_gates(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.input == "-" else Path(args.input).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{args.input}: not JSON ({err})") from None
    values, inject, vision, tokens = load_gates(data)
    out = draw_gates(values, Path(args.out), inject, vision, tokens, title=args.title)
    print(f"wrote {out} ({values.shape[0]} tokens x {len(inject)} injection layers x {len(vision)} vision layers)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gates", help="draw the gates of a chat completion (return_gates) as a PNG heatmap")
    p.add_argument("input", help="JSON file (or - for stdin): a chat completion with gates, or its gates object")
    p.add_argument("--out", default="gates.png", help="PNG file to write")
    p.add_argument("--title", help="figure title")
    p.set_defaults(func=cmd_gates)

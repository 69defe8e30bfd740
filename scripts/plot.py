#!/usr/bin/env python3
"""Figures for patch-train (matplotlib, written atomically).

  plot.py masks MASKS.safetensors --out masks.png
      every layer's tile map to scale (dark = dense tile; for unstructured files
      the kept fraction per tile), blocks by layers in model order, each with its
      density, and the density (kept fraction) per decoder block.
  plot.py sweep sweep.json --out sweep.png
      sparsity against perplexity, one line per method.
  plot.py curves metrics.jsonl --out curves.png
      a training run's loss, soft/hard density and validation perplexity per step.
"""
import argparse
import json
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402

PATTERNS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def save(fig, out):
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out)


def layer_maps(path):
    """name -> (tile map in [0, 1] (1 = dense / all kept), kept weights, weights)."""
    out = {}
    with safe_open(path, framework="np") as f:
        meta = f.metadata()
        tr, tc = (int(x) for x in meta["tile"].split("x"))
        names = sorted({k.rsplit(".", 1)[0] for k in f.keys()})
        for name in names:
            if meta.get("structure") == "unstructured":
                keep = np.unpackbits(f.get_tensor(name + ".keep"), axis=1, bitorder="little").astype(np.float64)
                rows, cols = -(-keep.shape[0] // tr), -(-keep.shape[1] // tc)
                tiles = np.zeros((rows, cols))
                for r in range(rows):
                    for c in range(cols):
                        tiles[r, c] = keep[r * tr:(r + 1) * tr, c * tc:(c + 1) * tc].mean()
                out[name] = (tiles, keep.sum(), keep.size)
            else:
                td = f.get_tensor(name + ".tile_dense").astype(np.float64)
                pat = f.get_tensor(name + ".pattern_2_4")
                dense = np.repeat(np.repeat(td, tr, axis=0), tc, axis=1)[:pat.shape[0], :pat.shape[1] * 4]
                kept = dense.sum() + 0.5 * (dense.size - dense.sum())
                out[name] = (td, kept, dense.size)
    return meta, out


# The linear layers of a decoder block in the order the model runs them.
MODEL_ORDER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def kind_of(name):
    return re.sub(r"^.*layers\.\d+\.", "", name)


def block_of(name):
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else 0


def masks(args):
    """Tile maps drawn to scale (a 384x128 layer is three times as tall as a
    128x128 one), blocks top to bottom and layers in model order, each map
    labelled with its density; then the density per block."""
    meta, maps = layer_maps(args.path)
    blocks = sorted({block_of(n) for n in maps})
    kinds = sorted({kind_of(n) for n in maps},
                   key=lambda k: (MODEL_ORDER.index(k) if k in MODEL_ORDER else len(MODEL_ORDER), k))
    tr, tc = (int(x) for x in meta["tile"].split("x"))
    # Weight extents: a column as wide as its widest layer, a row as tall as the tallest.
    width = {k: max(v[0].shape[1] * tc for n, v in maps.items() if kind_of(n) == k) for k in kinds}
    height = max(v[0].shape[0] * tr for v in maps.values())
    total_w = sum(width.values()) * 1.08
    total_h = height * len(blocks) * 1.12
    scale = min(13.0 / total_w, 40.0 / total_h)  # inches per weight
    maps_h = max(total_h * scale, 1.5)
    fig = plt.figure(figsize=(max(total_w * scale, 6.0), maps_h + 2.6))
    grid = fig.add_gridspec(len(blocks) + 1, len(kinds), width_ratios=[width[k] for k in kinds],
                            height_ratios=[height] * len(blocks) + [height * len(blocks) * 2.2 / maps_h],
                            wspace=0.08, hspace=0.12)
    for n, (tiles, kept, total) in maps.items():
        b, k = blocks.index(block_of(n)), kinds.index(kind_of(n))
        ax = fig.add_subplot(grid[b, k])
        rows, cols = tiles.shape[0] * tr, tiles.shape[1] * tc
        ax.imshow(tiles, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", extent=(0, cols, rows, 0))
        pad = max(width.values()) * 0.004  # keeps the frame's outer half-line visible
        ax.set_xlim(-pad, width[kind_of(n)] + pad)
        ax.set_ylim(height + pad, -pad)
        ax.set_aspect("equal", adjustable="box", anchor="NW")
        ax.axis("off")
        ax.add_patch(plt.Rectangle((0, 0), cols, rows, fill=False, lw=0.5, color="0.4"))
        # Inside the map's corner, on white: readable however narrow the column.
        ax.text(0, 0, f"{kept / total:.2f}", fontsize=6, va="top", ha="left", color="tab:red",
                bbox=dict(facecolor="white", edgecolor="none", pad=0.5, alpha=0.85))
        if b == 0:
            ax.set_title(kinds[k].split(".")[-1], fontsize=7)
        if k == 0:
            ax.text(-width[kinds[0]] * 0.04, rows / 2, f"block {blocks[b]}", fontsize=6, rotation=90, va="center",
                    ha="right")
    ax = fig.add_subplot(grid[len(blocks), :])
    dens = []
    for b in blocks:
        kept = sum(v[1] for n, v in maps.items() if block_of(n) == b)
        total = sum(v[2] for n, v in maps.items() if block_of(n) == b)
        dens.append(kept / total)
    ax.bar([str(b) for b in blocks], dens, color="tab:blue")
    ax.axhline(1.0 - float(meta.get("achieved_sparsity", "nan")), color="k", lw=0.8, ls="--", label="overall")
    ax.set_ylim(min(0.45, min(dens) - 0.05), 1.0)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("density (kept)")
    ax.legend(fontsize=7)
    what = " ".join(x for x in (meta.get('mode'), meta.get('method')) if x)
    fig.suptitle(f"{os.path.basename(args.path)}: {what}, "
                 f"sparsity {float(meta.get('achieved_sparsity', 'nan')):.4f} "
                 f"(dark = dense tile; red = the layer's density, kept fraction)", fontsize=9)
    save(fig, args.out)


def curves(args):
    """Training curves of a metrics.jsonl: loss, densities, validation perplexity."""
    rows = []
    with open(args.path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    train = [r for r in rows if "ce" in r]
    valid = [r for r in rows if "valid_ppl" in r]
    if not train and not valid:
        raise SystemExit(f"{args.path}: no training lines (step, ce, soft_density) to plot")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["ce"] for r in train], lw=1, label="LM loss")
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, alpha=0.7, label="total loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot([r["step"] for r in train], [r["soft_density"] for r in train], lw=1, label="soft density")
    ax.plot([r["step"] for r in train], [r["hard_density"] for r in train], lw=1, label="hard density (by sign)")
    hard = [r for r in valid if "hard_sparsity" in r]
    ax.plot([r["step"] for r in hard], [1 - r["hard_sparsity"] for r in hard], "k.", ms=4,
            label="hardened at the target")
    ax.set_xlabel("step")
    ax.set_ylabel("density (kept fraction)")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot([r["step"] for r in valid], [r["valid_ppl"] for r in valid], marker="o", ms=3, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity (hardened masks)")
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(args.title or f"training curves: {args.path}", fontsize=9)
    fig.tight_layout()
    save(fig, args.out)


def sweep(args):
    with open(args.path) as f:
        points = json.load(f)["points"]
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = []
    for p in points:
        if p["method"] not in methods:
            methods.append(p["method"])
    for m in methods:
        pts = sorted((p["sparsity"], p["perplexity"]) for p in points if p["method"] == m and p.get("perplexity"))
        if not pts:
            continue
        xs, ys = zip(*pts)
        if m == "dense":
            ax.axhline(ys[0], color="k", lw=0.8, ls="--", label=f"dense ({ys[0]:.2f})")
        else:
            ax.plot(xs, ys, marker="o", label=m)
    ax.set_xlabel("sparsity")
    ppl = [p["perplexity"] for p in points if p.get("perplexity")]
    # A collapsed baseline (magnitude 2:4 on a real model) would flatten the rest.
    log = ppl and max(ppl) / min(ppl) > 20
    if log:
        ax.set_yscale("log")
    ax.set_ylabel("perplexity" + (" (log scale)" if log else ""))
    ax.set_title(args.title or "perplexity against sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, args.out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["masks", "sweep", "curves"])
    ap.add_argument("path")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    {"masks": masks, "sweep": sweep, "curves": curves}[args.what](args)


if __name__ == "__main__":
    main()

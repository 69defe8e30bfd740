#!/usr/bin/env python3
"""Figures for patch-train (matplotlib, written atomically).

  plot.py masks MASKS.safetensors --out masks.png
      every layer's tile map (dark = dense tile; for unstructured files the kept
      fraction per tile) in a grid of blocks x layer kinds, and the density
      (kept fraction) per decoder block.
  plot.py sweep sweep.json --out sweep.png
      sparsity against perplexity, one line per method.
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


def masks(args):
    meta, maps = layer_maps(args.path)
    blocks = sorted({int(m.group(1)) for n in maps for m in [re.search(r"layers\.(\d+)\.", n)] if m})
    kinds = []
    for n in maps:
        kind = re.sub(r"^.*layers\.\d+\.", "", n)
        if kind not in kinds:
            kinds.append(kind)
    nb, nk = max(len(blocks), 1), len(kinds)
    fig = plt.figure(figsize=(1.6 * nk + 3, 1.2 * nb + 2.5))
    grid = fig.add_gridspec(nb + 1, nk, height_ratios=[1.0] * nb + [1.6])
    for n, (tiles, _, _) in maps.items():
        m = re.search(r"layers\.(\d+)\.", n)
        b = blocks.index(int(m.group(1))) if m else 0
        ax = fig.add_subplot(grid[b, kinds.index(re.sub(r"^.*layers\.\d+\.", "", n))])
        ax.imshow(tiles, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if b == 0:
            ax.set_title(kinds[kinds.index(re.sub(r"^.*layers\.\d+\.", "", n))], fontsize=7)
        if kinds.index(re.sub(r"^.*layers\.\d+\.", "", n)) == 0:
            ax.set_ylabel(f"block {blocks[b] if blocks else 0}", fontsize=7)
    ax = fig.add_subplot(grid[nb, :])
    dens = []
    for b in blocks:
        kept = sum(v[1] for n, v in maps.items() if f"layers.{b}." in n)
        total = sum(v[2] for n, v in maps.items() if f"layers.{b}." in n)
        dens.append(kept / total)
    ax.bar([str(b) for b in blocks], dens, color="tab:blue")
    ax.axhline(1.0 - float(meta.get("achieved_sparsity", "nan")), color="k", lw=0.8, ls="--", label="overall")
    ax.set_ylim(0.45, 1.0)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("density (kept)")
    ax.legend(fontsize=7)
    fig.suptitle(f"{os.path.basename(args.path)}: {meta.get('mode')} {meta.get('method', '')}, "
                 f"sparsity {float(meta.get('achieved_sparsity', 'nan')):.4f} (dark = dense tile)", fontsize=9)
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
    ap.add_argument("what", choices=["masks", "sweep"])
    ap.add_argument("path")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    {"masks": masks, "sweep": sweep}[args.what](args)


if __name__ == "__main__":
    main()

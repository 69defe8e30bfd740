#!/usr/bin/env python3
"""`patch-train convert` against numpy: .npz mask files built here exactly as the
PATCH and MaskLLM releases describe them (np.packbits of the flattened boolean
keep-mask, big-endian bits; PATCH adds `<param>.__shape__` and a `__meta__`
JSON string; MaskLLM keys `<layer>.mask`), on TinyStories-656K's real shapes
with a tile size that leaves ragged edges. Checks: import gives the tile map
and 2:4 patterns the generator chose, export gives back bit-identical arrays,
verify passes, eval/pack/eval --packed run on the imported masks, and every
bad input is a one-line error naming the entry with nothing written.

  npz_interop.py --bin build/bin/patch-train --data ../shared/data --work DIR
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

PATTERNS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # the public code's order
LAYERS = [("self_attn.q_proj", 128, 128), ("self_attn.k_proj", 64, 128), ("self_attn.v_proj", 64, 128),
          ("self_attn.o_proj", 128, 128), ("mlp.gate_proj", 384, 128), ("mlp.up_proj", 384, 128),
          ("mlp.down_proj", 128, 384)]
TILE = 48  # 128 = 2 x 48 + 32, 64 = 48 + 16: ragged tiles on both axes

failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def hybrid_mask(rng, out, inp, tile, dense_share):
    """A random hybrid keep-mask, its tile map and its pattern per group."""
    rows, cols = -(-out // tile), -(-inp // tile)
    tile_dense = rng.random((rows, cols)) < dense_share
    pattern = rng.integers(0, 6, size=(out, inp // 4))
    table = np.zeros((6, 4), dtype=bool)
    for k, (a, b) in enumerate(PATTERNS):
        table[k, [a, b]] = True
    keep = table[pattern].reshape(out, inp)
    dense = np.kron(tile_dense, np.ones((tile, tile), dtype=bool))[:out, :inp]
    keep = keep | dense
    return keep, tile_dense, pattern


def patch_npz(path, masks, meta, compressed=True, shapes=True):
    arrays = {}
    for name, keep in masks.items():
        arrays[name + ".weight"] = np.packbits(keep.flatten())
        if shapes:
            arrays[name + ".weight.__shape__"] = np.array(keep.shape)
    if meta is not None:
        arrays["__meta__"] = np.array(json.dumps(meta))
    (np.savez_compressed if compressed else np.savez)(path, **arrays)


def run(args, *cmd):
    p = subprocess.run([args.bin, *cmd], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    model = os.path.join(args.data, "models", "tinystories-656k")
    text = os.path.join(args.data, "text", "tinystories", "tinystories_validation_head.txt")
    w = args.work
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    rng = np.random.default_rng(7)

    # ---- PATCH layout: import, export, round trip ----
    masks, maps, patterns = {}, {}, {}
    for block in range(2):
        for sub, out, inp in LAYERS:
            name = f"model.layers.{block}.{sub}"
            masks[name], maps[name], patterns[name] = hybrid_mask(rng, out, inp, TILE, 0.4)
    meta = {"base_model": "tinystories-656k", "sparsity": 0.3, "pattern": "2:4", "tile_size": TILE}
    src = os.path.join(w, "mask.npz")
    patch_npz(src, masks, meta)
    rc, out, err = run(args, "convert", "--masks", src, "--model", model, "--out", os.path.join(w, "in"))
    check(rc == 0, f"convert PATCH npz -> masks (rc {rc}: {err.strip()[-300:]})")
    ours = load_file(os.path.join(w, "in", "masks.safetensors"))
    ok_map = all(np.array_equal(ours[n + ".tile_dense"].astype(bool), maps[n]) for n in masks)
    check(ok_map, "imported tile maps are the generator's (ragged 48x48 tiles)")
    ok_pat = True
    for n in masks:
        sparse_groups = ~np.kron(maps[n], np.ones((TILE, TILE // 4), dtype=bool))[: masks[n].shape[0], : masks[n].shape[1] // 4]
        ok_pat &= np.array_equal(ours[n + ".pattern_2_4"][sparse_groups], patterns[n][sparse_groups])
    check(ok_pat, "imported 2:4 patterns are the generator's in every sparse tile")
    summary = json.loads(out)
    want_sparsity = 1 - sum(m.sum() for m in masks.values()) / sum(m.size for m in masks.values())
    check(abs(summary["sparsity"] - want_sparsity) < 1e-9, f"reported sparsity {summary['sparsity']} = {want_sparsity}")
    rc, out, err = run(args, "verify", "--masks", os.path.join(w, "in", "masks.safetensors"), "--model", model)
    check(rc == 0, f"verify passes on the imported file ({err.strip()[-200:]})")

    rc, out, err = run(args, "convert", "--masks", os.path.join(w, "in", "masks.safetensors"), "--to", "patch-npz",
                       "--out", os.path.join(w, "back"))
    check(rc == 0, f"convert masks -> PATCH npz (rc {rc}: {err.strip()[-300:]})")
    back = np.load(os.path.join(w, "back", "mask.npz"))
    orig = np.load(src)
    same = set(back.files) == set(orig.files) and all(
        np.array_equal(back[k], orig[k]) and back[k].dtype == orig[k].dtype for k in orig.files if k != "__meta__")
    check(same, "round trip npz -> masks -> npz: every array bit-identical, same keys and dtypes")
    m2 = json.loads(str(back["__meta__"]))
    check(m2["tile_size"] == [TILE, TILE] and m2["pattern"] == "2:4", f"exported __meta__ {m2}")
    check(all(np.array_equal(np.unpackbits(back[n + ".weight"])[: masks[n].size].reshape(masks[n].shape), masks[n])
              for n in masks), "np.unpackbits of the export is the original keep-mask")

    # Stored (np.savez, not compressed) archives read the same.
    stored = os.path.join(w, "stored.npz")
    patch_npz(stored, masks, meta, compressed=False)
    rc, out, err = run(args, "convert", "--masks", stored, "--out", os.path.join(w, "in-stored"))
    check(rc == 0, f"convert a stored (np.savez) archive without --model (rc {rc}: {err.strip()[-200:]})")
    if rc == 0:
        a = load_file(os.path.join(w, "in-stored", "masks.safetensors"))
        check(all(np.array_equal(a[k], ours[k]) for k in ours), "stored and deflated archives import identically")

    # The whole chain on the imported masks.
    imported = os.path.join(w, "in", "masks.safetensors")
    common = ["--model", model, "--data", text, "--set", "eval.max_windows=4", "--set", "data.seq_len=256"]
    rc1, o1, e1 = run(args, "eval", "--masks", imported, *common)
    rc2, o2, e2 = run(args, "pack", "--model", model, "--masks", imported, "--out", os.path.join(w, "packed"))
    rc3, o3, e3 = run(args, "eval", "--packed", os.path.join(w, "packed", "packed.safetensors"), *common)
    check(rc1 == 0 and rc2 == 0 and rc3 == 0, f"eval --masks, pack, eval --packed run ({e1[-200:]}{e2[-200:]}{e3[-200:]})")
    if rc1 == 0 and rc3 == 0:
        p1, p3 = json.loads(o1)["perplexity"], json.loads(o3)["perplexity"]
        check(abs(p1 - p3) <= 1e-3 * p1, f"masked and packed perplexity agree ({p1} vs {p3})")

    # bench-deploy times the imported masks' own layers on a GPU (CUDA builds with a device).
    packed = os.path.join(w, "packed", "packed.safetensors")
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    rc, out, err = run(args, "bench-deploy", "--packed", packed, "--tokens", "1,256", "--set", "model.device=" +
                       ("cuda" if cuda else "cpu"), "--set", "deploy.repeats=3")
    if cuda:
        rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
        totals = [r for r in rows if r["bench"] == "deploy_packed_total"]
        check(rc == 0 and len(totals) == 2 and all(r["layers"] == 14 for r in totals) and
              sum(r["bench"] == "deploy_packed_layer" for r in rows) == 28,
              f"bench-deploy --packed times the 14 imported layers at 1 and 256 tokens ({err.strip()[-300:]})")
    else:
        check(rc == 2 and "CUDA" in err, f"bench-deploy --packed without a GPU: one-line error ({err.strip()})")

    # ---- MaskLLM layout: 2:4 everywhere, no shapes ----
    ml = {n: hybrid_mask(rng, m.shape[0], m.shape[1], TILE, 0.0)[0] for n, m in masks.items()}
    ml_path = os.path.join(w, "mask_compressed.npz")
    np.savez_compressed(ml_path, **{n + ".mask": np.packbits(k) for n, k in ml.items()})
    rc, out, err = run(args, "convert", "--masks", ml_path, "--out", os.path.join(w, "ml-nomodel"))
    check(rc != 0 and "--model" in err and not os.path.exists(os.path.join(w, "ml-nomodel")),
          f"MaskLLM npz without --model: one-line error, nothing written ({err.strip()})")
    rc, out, err = run(args, "convert", "--masks", ml_path, "--model", model, "--set", "mask.tile=[64,64]",
                       "--out", os.path.join(w, "ml"))
    check(rc == 0 and json.loads(out)["dense_tiles"] == 0 and abs(json.loads(out)["sparsity"] - 0.5) < 1e-12,
          f"convert MaskLLM npz -> masks: every tile 2:4 ({err.strip()[-200:]})")
    rc, out, err = run(args, "convert", "--masks", os.path.join(w, "ml", "masks.safetensors"), "--to", "maskllm-npz",
                       "--out", os.path.join(w, "ml-back"))
    mb = np.load(os.path.join(w, "ml-back", "mask_compressed.npz"))
    mo = np.load(ml_path)
    check(rc == 0 and set(mb.files) == set(mo.files) and all(np.array_equal(mb[k], mo[k]) for k in mo.files),
          "round trip MaskLLM npz -> masks -> npz bit-identical")
    rc, out, err = run(args, "verify", "--masks", os.path.join(w, "ml", "masks.safetensors"), "--model", model)
    check(rc == 0, "verify passes on the imported MaskLLM file")

    # ---- bad input: one line naming the entry, non-zero exit, nothing written ----
    def refused(label, path, needle, *extra):
        out_dir = os.path.join(w, "bad-" + label)
        rc, out, err = run(args, "convert", "--masks", path, "--out", out_dir, *extra)
        lines = [l for l in err.strip().splitlines() if l.strip()]
        check(rc != 0 and len(lines) == 1 and needle in lines[0] and not os.path.exists(out_dir),
              f"{label}: refused in one line naming '{needle}' ({err.strip()})")

    first = "model.layers.0.self_attn.q_proj"
    bad = dict(masks)
    bad[first] = masks[first][:, :124]  # its shape disagrees with the model
    patch_npz(os.path.join(w, "shape.npz"), bad, meta)
    refused("shape", os.path.join(w, "shape.npz"), first + ".weight", "--model", model)
    arrays = dict(np.load(src))
    arrays[first + ".weight"] = masks[first].astype(np.float32).flatten()
    np.savez(os.path.join(w, "float.npz"), **arrays)
    refused("non-boolean", os.path.join(w, "float.npz"), first + ".weight")
    arrays = dict(np.load(src))
    del arrays[first + ".weight.__shape__"]
    np.savez(os.path.join(w, "noshape.npz"), **arrays)
    refused("missing-shape", os.path.join(w, "noshape.npz"), first + ".weight.__shape__")
    arrays = dict(np.load(src))
    arrays["model.layers.0.mlp.fc9.weight"] = arrays.pop(first + ".weight")
    arrays["model.layers.0.mlp.fc9.weight.__shape__"] = arrays.pop(first + ".weight.__shape__")
    np.savez(os.path.join(w, "unknown.npz"), **arrays)
    refused("unknown-layer", os.path.join(w, "unknown.npz"), "model.layers.0.mlp.fc9")
    refused("tile-not-dividing", src, "does not divide", "--set", "mask.tile=[32,32]")
    # A tile that is neither dense nor 2:4: refused, or repaired with --model.
    broken = dict(masks)
    k = masks[first].copy()
    k[0, 0:4] = [True, True, True, False]  # tile (0, 0), dense or 2:4, now has a group of three
    broken[first] = k
    patch_npz(os.path.join(w, "neither.npz"), broken, meta)
    refused("neither-dense-nor-2:4", os.path.join(w, "neither.npz"), "tile (0, 0)")
    rc, out, err = run(args, "convert", "--masks", os.path.join(w, "neither.npz"), "--model", model, "--set",
                       "convert.repair=true", "--out", os.path.join(w, "repaired"))
    rep = json.loads(out) if rc == 0 else {}
    check(rc == 0 and rep.get("repaired_tiles") == 1 and rep.get("changed_weights", 0) >= 1,
          f"convert.repair=true repairs the one tile ({rep}, {err.strip()[-200:]})")
    rc, out, err = run(args, "verify", "--masks", os.path.join(w, "repaired", "masks.safetensors"), "--model", model)
    check(rc == 0, "verify passes on the repaired file")

    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

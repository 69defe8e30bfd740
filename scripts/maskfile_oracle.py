#!/usr/bin/env python3
"""Independent reader/writer of masks.safetensors for the maskfile tests.

  read PATH   print JSON: metadata, and per layer the shapes, the rebuilt 0/1
              mask (rows as strings) and its zero count, using the safetensors
              library and numpy only (hybrid and unstructured files).
  write PATH  write a small mask file with known contents (see the C++ test).
"""
import json
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

# docs/mask_format.md: pattern k keeps these positions of a group of four.
PATTERNS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def rebuild(tile_dense, pattern, tile_rows, tile_cols):
    out, groups = pattern.shape
    inp = groups * 4
    table = np.zeros((6, 4), dtype=np.uint8)
    for k, kept in enumerate(PATTERNS):
        table[k, list(kept)] = 1
    m24 = table[pattern.astype(np.int64)].reshape(out, inp)
    dense = np.repeat(np.repeat(tile_dense, tile_rows, axis=0), tile_cols, axis=1)[:out, :inp]
    return np.maximum(m24, dense)


def read(path):
    result = {"layers": {}}
    with safe_open(path, framework="np") as f:
        meta = f.metadata()
        result["metadata"] = meta
        rows, cols = (int(x) for x in meta["tile"].split("x"))
        names = sorted({k.rsplit(".", 1)[0] for k in f.keys()})
        if meta.get("structure") == "unstructured":
            # Bit j % 8 of byte j // 8, least significant first.
            for name in names:
                bits = f.get_tensor(name + ".keep")
                mask = np.unpackbits(bits, axis=1, bitorder="little")
                result["layers"][name] = {"dtype": [str(bits.dtype)], "zeros": int((mask == 0).sum()),
                                          "mask": ["".join(str(int(v)) for v in row) for row in mask]}
            print(json.dumps(result))
            return
        for name in names:
            td = f.get_tensor(name + ".tile_dense")
            pat = f.get_tensor(name + ".pattern_2_4")
            mask = rebuild(td, pat, rows, cols)
            result["layers"][name] = {
                "dtype": [str(td.dtype), str(pat.dtype)],
                "tile_dense_shape": list(td.shape),
                "pattern_shape": list(pat.shape),
                "zeros": int((mask == 0).sum()),
                "mask": ["".join(str(int(v)) for v in row) for row in mask],
            }
    print(json.dumps(result))


def write(path):
    out, inp = 6, 16
    pattern = np.array([[(i * 4 + g) % 6 for g in range(inp // 4)] for i in range(out)], dtype=np.uint8)
    tile_dense = np.array([[1, 0], [0, 1]], dtype=np.uint8)
    save_file({"model.layers.0.mlp.up_proj.tile_dense": tile_dense,
               "model.layers.0.mlp.up_proj.pattern_2_4": pattern},
              path,
              metadata={"format": "patch-masks", "format_version": "1", "tile": "4x8", "mode": "joint",
                        "target_sparsity": "0.25", "achieved_sparsity": "0.25",
                        "model_config_hash": "", "model_source": "python",
                        "training_config": "{}", "created_by": "maskfile_oracle.py"})


if __name__ == "__main__":
    {"read": read, "write": write}[sys.argv[1]](sys.argv[2])

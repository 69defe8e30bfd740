#!/usr/bin/env python3
"""Downloads the shared test assets listed in data/manifest.json and checks sha256.

Used by scripts/setup.sh on machines that have no ../shared/data but can reach
the sources. Files already present with the right hash are kept.
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile
import urllib.request


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--dest", required=True)
    args = ap.parse_args()
    with open(args.manifest) as f:
        manifest = json.load(f)
    failed = 0
    for asset in manifest["assets"]:
        path = os.path.join(args.dest, asset["path"])
        if os.path.exists(path) and sha256(path) == asset["sha256"]:
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"fetching {asset['path']}", flush=True)
        try:
            with urllib.request.urlopen(asset["url"], timeout=60) as r:
                data = r.read()
        except Exception as e:  # noqa: BLE001 - report and go on to the next asset
            print(f"{asset['path']}: download failed: {e}", file=sys.stderr)
            failed += 1
            continue
        if asset.get("transform") == "strip_cr":
            data = data.replace(b"\r", b"")
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        if sha256(tmp) != asset["sha256"]:
            os.unlink(tmp)
            print(f"{asset['path']}: sha256 mismatch", file=sys.stderr)
            failed += 1
            continue
        os.replace(tmp, path)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

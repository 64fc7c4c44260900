#!/usr/bin/env python3
"""Top-1 agreement of models with a reference model, in onnxruntime.

    .venv/bin/python tests/bench/ort_agree.py REF.onnx OTHER.onnx [OTHER2.onnx ...]
        --images DIR_OR_LIST [--limit N] [--skip N] [--size 224] [--resize 256]
        [--mean 0.485,0.456,0.406] [--std 0.229,0.224,0.225] [--manifest CSV] [--json OUT]
        [--save-npy X.npy]

Images: a folder (recursively, sorted by path) or a text file of paths. Each image
is prepared as torchvision does for ImageNet: RGB, short side resized to --resize
(PIL bilinear), centre crop --size, /255, (x - mean) / std, NCHW float32.

Every model runs in two onnxruntime sessions: the default one (all graph
optimizations, as a user's session) and one with optimizations disabled
(ORT_DISABLE_ALL). For each OTHER the script prints top-1 agreement with REF's
default-session top-1, in both sessions, and, with --manifest (the CSV of
shared/data/fetch-real-photos.sh: file, ..., labels), top-1 accuracy on the
labelled images (a prediction is right when it is in the image's label set).
--save-npy writes the prepared tensors (N x 3 x size x size) so that tract sees
the very inputs onnxruntime saw: `onnx-micronet validate REF OTHER --data X.npy
--preprocess raw`.
"""

import argparse
import csv
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image


def list_images(spec):
    if os.path.isdir(spec):
        out = []
        for root, _, files in os.walk(spec):
            for f in files:
                if f.lower().endswith((".jpg", ".jpeg", ".png")):
                    out.append(os.path.join(root, f))
        return sorted(out)
    with open(spec) as f:
        return [l.strip() for l in f if l.strip()]


def prep(path, size, resize, mean, std):
    im = Image.open(path).convert("RGB")
    w, h = im.size
    if w <= h:
        nw, nh = resize, int(resize * h / w)
    else:
        nw, nh = int(resize * w / h), resize
    im = im.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    im = im.crop((left, top, left + size, top + size))
    a = np.asarray(im, np.float32) / np.float32(255)
    return ((a - mean) / std).transpose(2, 0, 1)


def run(path, x, optimized):
    so = ort.SessionOptions()
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    out = []
    for i in range(0, len(x), 16):
        out.append(s.run(None, {name: x[i : i + 16]})[0])
    return np.concatenate(out).argmax(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--images", required=True)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--skip", type=int, default=0)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--resize", type=int, default=256)
    ap.add_argument("--mean", default="0.485,0.456,0.406")
    ap.add_argument("--std", default="0.229,0.224,0.225")
    ap.add_argument("--manifest")
    ap.add_argument("--json")
    ap.add_argument("--save-npy")
    a = ap.parse_args()
    mean = np.array([float(v) for v in a.mean.split(",")], np.float32)
    std = np.array([float(v) for v in a.std.split(",")], np.float32)
    paths = list_images(a.images)[a.skip :]
    if a.limit:
        paths = paths[: a.limit]
    x = np.stack([prep(p, a.size, a.resize, mean, std) for p in paths]).astype(np.float32)
    if a.save_npy:
        np.save(a.save_npy, x)
    labels = {}
    if a.manifest:
        base = os.path.dirname(os.path.abspath(a.manifest))
        with open(a.manifest) as f:
            for row in csv.DictReader(f):
                if row.get("labels"):
                    full = os.path.realpath(os.path.join(base, row["file"]))
                    labels[full] = {int(v) for v in row["labels"].split()}
    lab = [labels.get(os.path.realpath(p)) for p in paths]  # symlinked splits: the real file
    ref = run(a.models[0], x, True)
    report = {"images": len(paths), "labelled": sum(l is not None for l in lab), "models": []}
    for m in a.models:
        r = {"model": m}
        for opt in (True, False):
            top = run(m, x, opt)
            key = "default" if opt else "no_opt"
            r[f"agree_{key}"] = float((top == ref).mean())
            if report["labelled"]:
                r[f"top1_{key}"] = float(np.mean([t in l for t, l in zip(top, lab) if l is not None]))
        report["models"].append(r)
        print(json.dumps(r))
    print(f"{len(paths)} images ({report['labelled']} labelled)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())

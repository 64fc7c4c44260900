"""Inference speed of a channel-pruned model against its original, batch 1, one
thread, in tract (`onnx-micronet validate --threads 1`) and in onnxruntime
(intra_op_num_threads = 1), measured in one run: the runs alternate original,
pruned, original, pruned, ... so machine noise hits both alike, and each figure
is the median of the rounds.

    channel_speed.py ORIGINAL.onnx PRUNED.onnx [--images N] [--rounds R] [--size S]

Inputs are N deterministic random tensors [1, 3, S, S] (speed only). Prints the
images per second of each model in each runtime, the speed-ups, and the file sizes.
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

import numpy as np
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target", "release", "onnx-micronet")


def tract(model, data):
    out = subprocess.run(
        [BIN, "validate", model, "--data", data, "--data-format", "npy", "--preprocess", "raw",
         "--threads", "1", "--json", "-"],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout)["runs"][0]["images_per_second"]


def onnxruntime(model, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    s.run(None, {name: x[:1]})
    t = time.perf_counter()
    for i in range(len(x)):
        s.run(None, {name: x[i:i + 1]})
    return len(x) / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("original")
    ap.add_argument("pruned")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    a = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((a.images, 3, a.size, a.size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "x.npy")
        np.save(data, x)
        runs = {k: [] for k in ("tract_o", "tract_p", "ort_o", "ort_p")}
        for _ in range(a.rounds):
            runs["tract_o"].append(tract(a.original, data))
            runs["tract_p"].append(tract(a.pruned, data))
            runs["ort_o"].append(onnxruntime(a.original, x))
            runs["ort_p"].append(onnxruntime(a.pruned, x))
    med = {k: statistics.median(v) for k, v in runs.items()}
    so, sp = os.path.getsize(a.original), os.path.getsize(a.pruned)
    print(f"| runtime (batch 1, 1 thread, {a.images} images x {a.rounds} rounds) | original img/s | pruned img/s | speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| tract (onnx-micronet validate) | {med['tract_o']:.1f} | {med['tract_p']:.1f} | {med['tract_p'] / med['tract_o']:.2f}x |")
    print(f"| onnxruntime {ort.__version__} | {med['ort_o']:.1f} | {med['ort_p']:.1f} | {med['ort_p'] / med['ort_o']:.2f}x |")
    print(f"\nfile: {so} -> {sp} bytes ({sp / so:.3f}x, {100 * (1 - sp / so):.1f}% smaller)")
    print("rounds:", json.dumps({k: [round(v, 1) for v in vs] for k, vs in runs.items()}))


if __name__ == "__main__":
    main()

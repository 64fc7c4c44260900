"""Inference throughput of `onnx-micronet validate` (tract) against onnxruntime on the
same images, batch 1, with 1 and 2 threads. Run by `make bench` after bench.py.

Data: a deterministic CIFAR-10 binary file of N random records (tests/bench/out/cifar_random_N.bin)
for the CIFAR-sized MobileNetV2 fixture. Both runtimes see the same preprocessed tensors
(ours reads the file with its CIFAR reader and the `cifar` preset; the ORT side applies
the same preset in numpy). Speed only: random pixels carry no accuracy meaning.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target", "release", "onnx-micronet")
MODEL = os.path.join(ROOT, "fixtures", "mobilenetv2_cifar_bn.onnx")
OUT = os.path.join(ROOT, "tests", "bench", "out")
N = int(os.environ.get("BENCH_IMAGES", "600"))


def make_data():
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"cifar_random_{N}.bin")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=(N, 1), dtype=np.uint8)
    pixels = rng.integers(0, 256, size=(N, 3072), dtype=np.uint8)
    if not os.path.exists(path):
        np.concatenate([labels, pixels], axis=1).tofile(path)
    x = pixels.reshape(N, 3, 32, 32).astype(np.float32) / 255.0
    mean = np.array([0.4914, 0.4822, 0.4465], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.2470, 0.2435, 0.2616], np.float32).reshape(1, 3, 1, 1)
    return path, (x - mean) / std


def ours(path, threads):
    out = subprocess.run(
        [BIN, "validate", MODEL, "--data", path, "--data-format", "cifar10", "--preprocess", "cifar",
         "--threads", str(threads), "--json", "-"],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout)["runs"][0]["images_per_second"]


def onnxruntime(x, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(MODEL, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    s.run(None, {name: x[:1]})
    t = time.perf_counter()
    for i in range(len(x)):
        s.run(None, {name: x[i:i + 1]})
    return len(x) / (time.perf_counter() - t)


def main():
    path, x = make_data()
    rows = []
    for threads in (1, 2):
        a = max(ours(path, threads) for _ in range(2))
        b = max(onnxruntime(x, threads) for _ in range(2))
        rows.append((threads, a, b))
    lines = [
        "",
        f"## Inference throughput: MobileNetV2-CIFAR fixture, {N} images, batch 1 (best of 2 runs)",
        "",
        "| threads | ours (tract) images/s | onnxruntime images/s | ours / onnxruntime |",
        "|---:|---:|---:|---:|",
    ]
    for threads, a, b in rows:
        lines.append(f"| {threads} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    lines.append("")
    lines.append("ours: one tract state per thread, one image at a time (the fastest setup measured); "
                 "onnxruntime: intra-op threads, one image at a time.")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(OUT, "results.md"), "a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())

"""Calibration speed (issue #14): our calibration against onnxruntime's quantize_static and
against a plain tract run over the same images, measured side by side in one run. Run by
`make bench` after validate_speed.py.

Model: the ImageNet MobileNetV2 export (fixtures/extra/mobilenet_v2_bn.onnx) when
`make fixtures-extra` made it, else the committed CIFAR MobileNetV2 fixture. Data: N
deterministic random tensors already normalized (`--preprocess raw`), written once as a
.npy under tests/bench/out/; speed only, random pixels carry no accuracy meaning.

Rows (wall seconds of the whole command, best of 2; ratios against the plain tract run):
- plain tract: `validate` over the N images (one inference each);
- activation ranges: `optimize --act-bits 8` (one capture of every quantized activation);
- + GPTQ and bias correction: `optimize --quantize minmax:8 --per-channel --act-bits 8`
  (Gram capture of every layer's inputs, the OBS sweeps, the bias-correction capture);
- onnxruntime quantize_static (QDQ, per-channel, MinMax, the same N tensors).
The calibration parts of our runs (the passes' own `seconds` in --report) are given
beside the wall time, which also holds the model's load, write and final score.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target", "release", "onnx-micronet")
OUT = os.path.join(ROOT, "tests", "bench", "out")
N = int(os.environ.get("BENCH_CALIB_IMAGES", "128"))


def model_and_shape():
    big = os.path.join(ROOT, "fixtures", "extra", "mobilenet_v2_bn.onnx")
    if os.path.exists(big):
        return big, (3, 224, 224)
    return os.path.join(ROOT, "fixtures", "mobilenetv2_cifar_bn.onnx"), (3, 32, 32)


def data(shape):
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"calib_random_{N}_{'x'.join(map(str, shape))}.npy")
    x = np.random.default_rng(0).standard_normal((N,) + shape).astype(np.float32)
    if not os.path.exists(path):
        np.save(path, x)
    return path, x


def timed(cmd):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - t


def ours(model, npy, flags, tmp):
    report = os.path.join(tmp, "r.json")
    cmd = [BIN, "optimize", model, "-o", os.path.join(tmp, "o.onnx"), "--calib", npy,
           "--preprocess", "raw", "--calib-samples", str(N), "--report", report] + flags
    wall = timed(cmd)
    with open(report) as f:
        r = json.load(f)
    passes = {p["pass"]: p.get("seconds", 0.0) for p in r["passes"]}
    return wall, passes


def onnxruntime_static(model, x, tmp):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    import onnx

    pre = os.path.join(tmp, "pre.onnx")
    quant_pre_process(model, pre, skip_symbolic_shape=True)
    name = onnx.load(pre).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.it, None)

    t = time.perf_counter()
    quantize_static(pre, os.path.join(tmp, "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return time.perf_counter() - t


def main():
    model, shape = model_and_shape()
    npy, x = data(shape)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = min(timed([BIN, "validate", model, "--data", npy, "--preprocess", "raw",
                           "--limit", str(N)]) for _ in range(2))
        acts = min((ours(model, npy, ["--act-bits", "8"], tmp) for _ in range(2)), key=lambda r: r[0])
        full = min((ours(model, npy, ["--quantize", "minmax:8", "--per-channel", "--act-bits", "8"], tmp)
                    for _ in range(2)), key=lambda r: r[0])
        ort_s = min(onnxruntime_static(model, x, tmp) for _ in range(2))
    rows.append(("plain tract run (`validate`)", plain, ""))
    rows.append(("activation ranges (`--act-bits 8`)", acts[0],
                 f"act-quant {acts[1].get('act-quant', 0):.2f} s"))
    rows.append(("+ GPTQ + bias correction (`--quantize minmax:8 --per-channel --act-bits 8`)", full[0],
                 ", ".join(f"{k} {v:.2f} s" for k, v in full[1].items() if v >= 0.01)))
    rows.append(("onnxruntime quantize_static (QDQ, per-channel, MinMax)", ort_s, ""))
    lines = [
        "",
        f"## Calibration speed: {os.path.relpath(model, ROOT)}, {N} images {shape}, best of 2",
        "",
        "| command | wall s | vs plain tract | vs onnxruntime | of which |",
        "|---|---:|---:|---:|---|",
    ]
    for name, s, parts in rows:
        lines.append(f"| {name} | {s:.2f} | {s / plain:.2f}x | {s / ort_s:.2f}x | {parts} |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(OUT, "results.md"), "a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())

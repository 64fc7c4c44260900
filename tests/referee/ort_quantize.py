#!/usr/bin/env python3
"""onnxruntime's quantizers on one model, the forms `score` must referee.

    .venv/bin/python tests/referee/ort_quantize.py MODEL.onnx OUTDIR [--images DIR] [--n 16]

Writes into OUTDIR:
  qdq_int8.onnx      quantize_static, QDQ, per-channel int8 weights, uint8 activations, MinMax
  qdq_int4.onnx      quantize_static, QDQ, per-channel int4 weights (opset raised to 21),
                     uint8 activations
  qoperator.onnx     quantize_static, QOperator (QLinearConv, QLinearAdd, QLinearMatMul or
                     QGemm, QLinearGlobalAveragePool, ...), per-channel int8 weights
  dynamic.onnx       quantize_dynamic (ConvInteger, MatMulInteger, DynamicQuantizeLinear)
The calibration reader feeds --n images from --images (a folder, prepared like
torchvision for 224-px models, or resized straight to the input size below that),
or seeded random inputs without --images. The model is first run through
onnxruntime's `quant_pre_process` (shape inference, BN folding) as the
onnxruntime docs advise, into OUTDIR/pre.onnx.
"""

import argparse
import os
import sys

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process


def inputs_of(model_path, images, n):
    m = onnx.load(model_path)
    inp = m.graph.input[0]
    dims = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    name = inp.name
    rng = np.random.default_rng(0)
    if not images:
        return name, [rng.standard_normal([1] + dims[1:]).astype(np.float32) for _ in range(n)]
    from PIL import Image

    files = sorted(
        os.path.join(images, f)
        for f in os.listdir(images)
        if f.lower().endswith((".png", ".jpg", ".jpeg"))
    )[:n]
    c, h, w = dims[1], dims[2], dims[3]
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    out = []
    for f in files:
        im = Image.open(f).convert("RGB").resize((w, h), Image.BILINEAR)
        a = (np.asarray(im, np.float32) / 255 - mean) / std
        out.append(a.transpose(2, 0, 1)[None].astype(np.float32))
    return name, out


class Reader(CalibrationDataReader):
    def __init__(self, name, xs):
        self.it = iter([{name: x} for x in xs])

    def get_next(self):
        return next(self.it, None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--images")
    ap.add_argument("--n", type=int, default=16)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    pre = os.path.join(a.out, "pre.onnx")
    quant_pre_process(a.model, pre, skip_symbolic_shape=True)
    name, xs = inputs_of(pre, a.images, a.n)
    common = dict(
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    quantize_static(pre, os.path.join(a.out, "qdq_int8.onnx"), Reader(name, xs),
                    quant_format=QuantFormat.QDQ, **common)
    quantize_static(pre, os.path.join(a.out, "qoperator.onnx"), Reader(name, xs),
                    quant_format=QuantFormat.QOperator, **common)
    # int4 Q/DQ needs opset 21 (IR 10).
    m = onnx.load(pre)
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, 21)
    m.ir_version = max(m.ir_version, 10)
    pre21 = os.path.join(a.out, "pre21.onnx")
    onnx.save(m, pre21)
    quantize_static(pre21, os.path.join(a.out, "qdq_int4.onnx"), Reader(name, xs),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt4)
    quantize_dynamic(pre, os.path.join(a.out, "dynamic.onnx"), weight_type=QuantType.QInt8)
    for f in ("qdq_int8", "qdq_int4", "qoperator", "dynamic"):
        p = os.path.join(a.out, f + ".onnx")
        ops = sorted({n.op_type for n in onnx.load(p).graph.node})
        print(f, os.path.getsize(p), ops)


if __name__ == "__main__":
    sys.exit(main())

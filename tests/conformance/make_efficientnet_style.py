#!/usr/bin/env python3
"""A small EfficientNet-B0-style classifier as ONNX, with seeded random weights.

    python make_efficientnet_style.py                      # -> fixtures/efficientnet_style_bn.onnx
    python make_efficientnet_style.py -o X.onnx --sparsity 0.6   # magnitude-pruned variant

Synthetic topology, random weights (numpy default_rng(seed)); it classifies nothing. It exists
to exercise the MicroNet counting of the EfficientNet op mix (micronet-rules.md §3.2, NB):

* MBConv blocks: 1x1 expand conv + BN + swish, depthwise kxk conv + BN + swish,
  squeeze-and-excite, 1x1 project conv + BN (no activation), residual Add when
  stride 1 and c_in == c_out;
* swish written as Sigmoid + Mul (x * sigmoid(x));
* SE as in TPU efficientnet_model.py: GlobalAveragePool -> 1x1 conv with bias (C -> C_red,
  C_red = max(1, int(block input filters * 0.25))) -> swish -> 1x1 conv with bias
  (C_red -> C) -> Sigmoid -> Mul with the features;
* every non-SE conv is followed by a BatchNormalization node (kept, not folded); the
  stem conv also has its own bias, so "conv bias + BN count once" is exercised;
* head: 1x1 conv + BN + swish, GlobalAveragePool, Flatten, Gemm (with bias) -> logits.

Input `input` [N,3,64,64] float32 (batch N dynamic), output `logits` [N,10], opset 13, IR 8.
Depthwise kernels are padded k//2 on every side (odd kernels: output = ceil(in / stride)).

--sparsity S zeroes, in every Conv weight (stem, expand, depthwise, SE, project, head; not
the Gemm, not biases or BN), the round(S * numel) entries of smallest magnitude (stable
argsort, so ties are broken by position): a deterministic magnitude-pruned variant.

Checked with onnx.checker (full_check) and run once in onnxruntime (batch 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "fixtures" / "efficientnet_style_bn.onnx"

INPUT_HW = 64
NUM_CLASSES = 10
STEM = 16
HEAD = 160
# (expand_ratio, kernel, stride, c_in, c_out) per MBConv block, B0's first stages shrunk.
BLOCKS = [
    (1, 3, 1, 16, 8),
    (6, 3, 2, 8, 12),
    (6, 3, 1, 12, 12),
    (6, 5, 2, 12, 20),
    (6, 5, 1, 20, 20),
    (6, 3, 2, 20, 40),
    (6, 3, 1, 40, 40),
]
SE_RATIO = 0.25
BN_EPS = 1e-3


class Builder:
    def __init__(self, seed: int, sparsity: float):
        self.rng = np.random.default_rng(seed)
        self.sparsity = sparsity
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, a: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(a.astype(np.float32), name))
        return name

    def prune(self, w: np.ndarray) -> np.ndarray:
        if self.sparsity <= 0:
            return w
        k = int(round(self.sparsity * w.size))
        flat = w.reshape(-1).copy()
        order = np.argsort(np.abs(flat), kind="stable")
        flat[order[:k]] = 0.0
        return flat.reshape(w.shape)

    def conv(self, name, x, c_in, c_out, k, stride=1, group=1, bias=False) -> str:
        fan_in = (c_in // group) * k * k
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(c_out, c_in // group, k, k))
        inputs = [x, self.init(f"{name}.weight", self.prune(w))]
        if bias:
            inputs.append(self.init(f"{name}.bias", self.rng.normal(0.0, 0.1, size=c_out)))
        p = k // 2
        self.nodes.append(helper.make_node(
            "Conv", inputs, [f"{name}.out"], name=name, kernel_shape=[k, k],
            strides=[stride, stride], pads=[p, p, p, p], group=group))
        return f"{name}.out"

    def bn(self, name, x, c) -> str:
        r = self.rng
        ins = [x,
               self.init(f"{name}.gamma", r.uniform(0.5, 1.5, c)),
               self.init(f"{name}.beta", r.normal(0.0, 0.1, c)),
               self.init(f"{name}.mean", r.normal(0.0, 0.1, c)),
               self.init(f"{name}.var", r.uniform(0.5, 1.5, c))]
        self.nodes.append(helper.make_node("BatchNormalization", ins, [f"{name}.out"], name=name,
                                           epsilon=BN_EPS))
        return f"{name}.out"

    def swish(self, name, x) -> str:
        self.nodes.append(helper.make_node("Sigmoid", [x], [f"{name}.sig"], name=f"{name}.sigmoid"))
        self.nodes.append(helper.make_node("Mul", [x, f"{name}.sig"], [f"{name}.out"], name=f"{name}.mul"))
        return f"{name}.out"

    def gap(self, name, x) -> str:
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], [f"{name}.out"], name=name))
        return f"{name}.out"

    def mbconv(self, i, expand, k, stride, c_in, c_out, x) -> str:
        b = f"blocks.{i}"
        c_exp = c_in * expand
        h = x
        if expand != 1:
            h = self.conv(f"{b}.expand_conv", h, c_in, c_exp, 1)
            h = self.bn(f"{b}.bn0", h, c_exp)
            h = self.swish(f"{b}.act0", h)
        h = self.conv(f"{b}.depthwise_conv", h, c_exp, c_exp, k, stride=stride, group=c_exp)
        h = self.bn(f"{b}.bn1", h, c_exp)
        h = self.swish(f"{b}.act1", h)
        # squeeze-and-excite
        c_red = max(1, int(c_in * SE_RATIO))
        s = self.gap(f"{b}.se.pool", h)
        s = self.conv(f"{b}.se.reduce", s, c_exp, c_red, 1, bias=True)
        s = self.swish(f"{b}.se.act", s)
        s = self.conv(f"{b}.se.expand", s, c_red, c_exp, 1, bias=True)
        self.nodes.append(helper.make_node("Sigmoid", [s], [f"{b}.se.gate"], name=f"{b}.se.sigmoid"))
        self.nodes.append(helper.make_node("Mul", [h, f"{b}.se.gate"], [f"{b}.se.out"], name=f"{b}.se.scale"))
        h = f"{b}.se.out"
        h = self.conv(f"{b}.project_conv", h, c_exp, c_out, 1)
        h = self.bn(f"{b}.bn2", h, c_out)
        if stride == 1 and c_in == c_out:
            self.nodes.append(helper.make_node("Add", [h, x], [f"{b}.out"], name=f"{b}.skip_add"))
            h = f"{b}.out"
        return h


def build(seed: int = 0, sparsity: float = 0.0) -> onnx.ModelProto:
    bld = Builder(seed, sparsity)
    h = bld.conv("stem.conv", "input", 3, STEM, 3, stride=2, bias=True)
    h = bld.bn("stem.bn", h, STEM)
    h = bld.swish("stem.act", h)
    for i, (e, k, s, ci, co) in enumerate(BLOCKS):
        h = bld.mbconv(i, e, k, s, ci, co, h)
    h = bld.conv("head.conv", h, BLOCKS[-1][4], HEAD, 1)
    h = bld.bn("head.bn", h, HEAD)
    h = bld.swish("head.act", h)
    h = bld.gap("head.pool", h)
    bld.nodes.append(helper.make_node("Flatten", [h], ["head.flat"], name="head.flatten", axis=1))
    w = bld.rng.normal(0.0, np.sqrt(1.0 / HEAD), size=(NUM_CLASSES, HEAD))
    bld.nodes.append(helper.make_node(
        "Gemm", ["head.flat", bld.init("classifier.weight", w),
                 bld.init("classifier.bias", bld.rng.normal(0.0, 0.01, NUM_CLASSES))],
        ["logits"], name="classifier", transB=1))
    graph = helper.make_graph(
        bld.nodes, "efficientnet_style",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, INPUT_HW, INPUT_HW])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", NUM_CLASSES])],
        initializer=bld.inits)
    doc = (f"Synthetic EfficientNet-B0-style topology, random weights (numpy seed {seed}"
           + (f", magnitude-pruned to {sparsity:g} per conv weight" if sparsity > 0 else "")
           + "); tests/conformance/make_efficientnet_style.py")
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8,
                          producer_name="onnx-micronet tests/conformance/make_efficientnet_style.py",
                          doc_string=doc)
    return m


def check(m: onnx.ModelProto) -> None:
    onnx.checker.check_model(m, full_check=True)
    import onnxruntime as ort

    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(123).normal(size=(2, 3, INPUT_HW, INPUT_HW)).astype(np.float32)
    (y,) = sess.run(["logits"], {"input": x})
    assert y.shape == (2, NUM_CLASSES), y.shape
    assert np.isfinite(y).all()
    assert not np.allclose(y[0], y[1]), "logits do not depend on the input"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sparsity", type=float, default=0.0, help="fraction of each conv weight to zero")
    ap.add_argument("--no-check", action="store_true", help="skip the checker and onnxruntime run")
    a = ap.parse_args()
    if not 0.0 <= a.sparsity < 1.0:
        ap.error("--sparsity must be in [0, 1)")
    m = build(a.seed, a.sparsity)
    if not a.no_check:
        check(m)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, a.output)
    print(f"wrote {a.output} ({a.output.stat().st_size} bytes, "
          f"{sum(int(np.prod(t.dims)) for t in m.graph.initializer)} initializer values)")


if __name__ == "__main__":
    main()

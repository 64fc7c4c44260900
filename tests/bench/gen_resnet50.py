#!/usr/bin/env python3
"""Generates the bench's ResNet-50 with unfused BatchNormalization.

    python tests/bench/gen_resnet50.py --out-dir tests/bench/out

writes (through a temporary folder, so an interrupted run leaves nothing behind):

    OUT_DIR/resnet50_bn.onnx                 one file (~102 MB)
    OUT_DIR/ext/resnet50_bn.onnx             the same model with external data ...
    OUT_DIR/ext/resnet50_bn.onnx.data        ... in one side file
    OUT_DIR/resnet50_bn.ok                   written last: the models were checked

and does nothing when the stamp is there (use --force to remake).

The model is ResNet-50 v1 (He et al. 2015; the stride of a downsampling bottleneck
is on its first 1x1 conv): 7x7/2 stem conv + BN + Relu + 3x3/2 MaxPool, bottleneck
stages [3, 4, 6, 3] of 1x1 / 3x3 / 1x1 convs each followed by an (unfused)
BatchNormalization, 1x1 projection shortcuts with BN on the first block of each
stage, Add + Relu, GlobalAveragePool, Flatten, Gemm 2048 -> 1000. The input is
float [N, 3, 224, 224] with N symbolic; opset 13. Weights are seeded random (He
scale), BN statistics look trained: mean ~ N(0, 0.1), var ~ U(0.5, 1.5),
gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1).

Both files are checked with onnx.checker (full check) and run once in
onnxruntime on a random input; the two layouts must give the same output.
Needs numpy, onnx and onnxruntime (the .venv that `make venv` creates).
"""

import argparse
import os
import shutil
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NAME = "resnet50_bn.onnx"
OPSET = 13


class Builder:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes = []
        self.inits = []
        self.n = 0

    def _name(self, kind):
        self.n += 1
        return f"{kind}_{self.n}"

    def _init(self, name, array):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def conv(self, x, cin, cout, k, stride=1):
        name = self._name("conv")
        fan_in = cin * k * k
        w = self.rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        self._init(f"{name}.weight", w)
        pad = k // 2
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.weight"],
                [f"{name}_out"],
                name=name,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
                dilations=[1, 1],
                group=1,
            )
        )
        return f"{name}_out"

    def bn(self, x, c):
        name = self._name("bn")
        r = self.rng
        self._init(f"{name}.weight", r.uniform(0.5, 1.5, c))
        self._init(f"{name}.bias", r.normal(0.0, 0.1, c))
        self._init(f"{name}.running_mean", r.normal(0.0, 0.1, c))
        self._init(f"{name}.running_var", r.uniform(0.5, 1.5, c))
        self.nodes.append(
            helper.make_node(
                "BatchNormalization",
                [x, f"{name}.weight", f"{name}.bias", f"{name}.running_mean", f"{name}.running_var"],
                [f"{name}_out"],
                name=name,
                epsilon=1e-5,
                momentum=0.9,
            )
        )
        return f"{name}_out"

    def op(self, kind, inputs, **attrs):
        name = self._name(kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def conv_bn(self, x, cin, cout, k, stride=1, relu=True):
        y = self.bn(self.conv(x, cin, cout, k, stride), cout)
        return self.op("Relu", [y]) if relu else y

    def bottleneck(self, x, cin, width, stride):
        cout = width * 4
        y = self.conv_bn(x, cin, width, 1, stride)
        y = self.conv_bn(y, width, width, 3, 1)
        y = self.conv_bn(y, width, cout, 1, 1, relu=False)
        if stride != 1 or cin != cout:
            x = self.conv_bn(x, cin, cout, 1, stride, relu=False)
        return self.op("Relu", [self.op("Add", [y, x])]), cout


def build(seed):
    b = Builder(seed)
    x = b.conv_bn("input", 3, 64, 7, 2)
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c = 64
    for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            x, c = b.bottleneck(x, c, width, stride if i == 0 else 1)
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Flatten", [x], axis=1)
    w = b.rng.standard_normal((1000, c), dtype=np.float32) * np.float32(np.sqrt(1.0 / c))
    b._init("fc.weight", w)
    b._init("fc.bias", b.rng.normal(0.0, 0.01, 1000))
    b.nodes.append(helper.make_node("Gemm", [x, "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        b.nodes,
        "resnet50_bn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        initializer=b.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="onnx-micronet tests/bench/gen_resnet50.py",
        producer_version="1",
        doc_string=f"ResNet-50 v1 with unfused BatchNormalization, random weights (seed {seed})",
    )
    return model


def run_ort(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"input": x})
    if y.shape != (x.shape[0], 1000) or not np.all(np.isfinite(y)):
        sys.exit(f"gen_resnet50: {path}: onnxruntime gave shape {y.shape}, finite={np.all(np.isfinite(y))}")
    return y


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--seed", type=int, default=50)
    ap.add_argument("--force", action="store_true", help="remake even when the stamp is there")
    args = ap.parse_args()

    out = os.path.abspath(args.out_dir)
    stamp = os.path.join(out, "resnet50_bn.ok")
    single = os.path.join(out, NAME)
    ext_dir = os.path.join(out, "ext")
    if not args.force and os.path.exists(stamp) and os.path.exists(single) and os.path.exists(os.path.join(ext_dir, NAME)):
        print(f"gen_resnet50: reusing {single} and {ext_dir}/ (delete {stamp} or pass --force to remake)")
        return

    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, ".gen-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "ext"))

    model = build(args.seed)
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    n_bn = sum(1 for n in model.graph.node if n.op_type == "BatchNormalization")
    n_conv = sum(1 for n in model.graph.node if n.op_type == "Conv")

    tmp_single = os.path.join(tmp, NAME)
    tmp_ext = os.path.join(tmp, "ext", NAME)
    onnx.save_model(model, tmp_single)
    # save_model with external data rewrites the tensors in place: single file first.
    onnx.save_model(
        model,
        tmp_ext,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=NAME + ".data",
        size_threshold=1024,
    )
    del model

    onnx.checker.check_model(tmp_single, full_check=True)
    onnx.checker.check_model(tmp_ext, full_check=True)
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224), dtype=np.float32)
    y1 = run_ort(tmp_single, x)
    y2 = run_ort(tmp_ext, x)
    if not np.array_equal(y1, y2):
        sys.exit("gen_resnet50: the single-file and external-data models give different outputs")

    # Move into place; the stamp goes last.
    if os.path.exists(stamp):
        os.remove(stamp)
    shutil.rmtree(ext_dir, ignore_errors=True)
    os.replace(tmp_single, single)
    os.replace(os.path.join(tmp, "ext"), ext_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    size = os.path.getsize(single)
    with open(stamp, "w") as f:
        f.write(f"seed={args.seed} params={n_params} bytes={size}\n")
    print(
        f"gen_resnet50: wrote {single} ({size / 1e6:.1f} MB, {n_params:,} params, {n_conv} Conv, "
        f"{n_bn} BatchNormalization) and {ext_dir}/; onnx.checker ok, onnxruntime ok "
        f"(logits std {float(y1.std()):.3g}); {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main()

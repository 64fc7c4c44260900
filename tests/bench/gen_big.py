#!/usr/bin/env python3
"""Generates the bench's model over 2 GiB, with external data (protobuf cannot hold it).

    python tests/bench/gen_big.py --out-dir tests/bench/out/big [--layers 9] [--channels 8192]

writes OUT_DIR/big.onnx and OUT_DIR/big.onnx.data (through temporary names, renamed
last): LAYERS blocks of a 1x1 Conv [C, C, 1, 1] (no bias) + unfused BatchNormalization
+ Relu on a [N, C, 1, 1] input, then GlobalAveragePool and Flatten. With the defaults,
9 x 8192^2 float32 = 2.25 GiB of weights. Every initializer is external (64-byte
aligned offsets). The weights are streamed to disk in chunks (seeded numpy), so making
it needs little memory. Checked with onnx.checker (the model file; full_check would
load 2.25 GiB into Python).
"""

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--channels", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=2)
    a = ap.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    model_path = os.path.join(a.out_dir, "big.onnx")
    data_name = "big.onnx.data"
    data_path = os.path.join(a.out_dir, data_name)
    if os.path.exists(model_path) and os.path.exists(data_path):
        print(f"gen_big: reusing {model_path}")
        return
    rng = np.random.default_rng(a.seed)
    c = a.channels
    inits, nodes = [], []
    tmp_data = data_path + ".partial"
    with open(tmp_data, "wb") as f:

        def external(name, shape, chunks):
            off = f.tell()
            pad = (-off) % 64
            f.write(b"\0" * pad)
            off += pad
            n = 0
            for chunk in chunks:
                b = np.ascontiguousarray(chunk, dtype="<f4").tobytes()
                f.write(b)
                n += len(b)
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(off)), ("length", str(n))):
                e = t.external_data.add()
                e.key, e.value = k, v
            inits.append(t)

        x = "input"
        scale = np.float32(np.sqrt(2.0 / c))
        for i in range(a.layers):
            rows = 512
            external(f"conv{i}.weight", [c, c, 1, 1],
                     (rng.standard_normal((rows, c), dtype=np.float32) * scale for _ in range(c // rows)))
            external(f"bn{i}.scale", [c], [rng.uniform(0.5, 1.5, c)])
            external(f"bn{i}.bias", [c], [rng.normal(0.0, 0.1, c)])
            external(f"bn{i}.mean", [c], [rng.normal(0.0, 0.1, c)])
            external(f"bn{i}.var", [c], [rng.uniform(0.5, 1.5, c)])
            nodes.append(helper.make_node("Conv", [x, f"conv{i}.weight"], [f"c{i}"], name=f"conv{i}", kernel_shape=[1, 1]))
            nodes.append(helper.make_node("BatchNormalization", [f"c{i}", f"bn{i}.scale", f"bn{i}.bias", f"bn{i}.mean", f"bn{i}.var"],
                                          [f"b{i}"], name=f"bn{i}", epsilon=1e-5))
            nodes.append(helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
        nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
        nodes.append(helper.make_node("Flatten", ["pool"], ["logits"], name="flatten", axis=1))
    graph = helper.make_graph(
        nodes, "big",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, 1, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", c])],
        initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                          producer_name="onnx-micronet tests/bench/gen_big.py")
    tmp_model = model_path + ".partial"
    with open(tmp_model, "wb") as f:
        f.write(m.SerializeToString())
    os.replace(tmp_data, data_path)
    try:
        # By path: the checker then finds the side file beside the model.
        onnx.checker.check_model(tmp_model)
    except Exception:
        os.remove(tmp_model)
        os.remove(data_path)
        raise
    os.replace(tmp_model, model_path)
    size = os.path.getsize(model_path) + os.path.getsize(data_path)
    print(f"gen_big: wrote {model_path} + {data_name} ({size / 2**30:.2f} GiB, {a.layers} x Conv {c}x{c} + BN)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""onnxoptimizer's BatchNorm fusion, the Python side of `make bench`.

    python tests/bench/py_fuse_bn.py IN.onnx OUT.onnx

onnx.load + onnxoptimizer.optimize(model, ["fuse_bn_into_conv"]) + onnx.save: the same
job as `onnx-micronet optimize` with BN folding only.
"""

import sys

import onnx
import onnxoptimizer


def main(argv):
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    model = onnx.load(argv[0])
    out = onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])
    left = sum(1 for n in out.graph.node if n.op_type == "BatchNormalization")
    onnx.save(out, argv[1])
    print(f"BatchNormalization left: {left}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""onnxruntime's dynamic (weight) quantization, the Python side of `make bench`.

    python tests/bench/py_quantize_dynamic.py IN.onnx OUT.onnx

onnxruntime.quantization.quantize_dynamic(IN, OUT, weight_type=QInt8): int8 weights,
no calibration. Its shape inference pre-pass is skipped as the tool's docs allow.
"""

import sys

from onnxruntime.quantization import QuantType, quantize_dynamic


def main(argv):
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    quantize_dynamic(argv[0], argv[1], weight_type=QuantType.QInt8)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

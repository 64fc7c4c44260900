#!/usr/bin/env python3
"""The Python side of `make bench`: onnx.load + onnx.save of one model.

    python tests/bench/py_roundtrip.py IN.onnx OUT.onnx [--external]

onnx.load reads external data by default. With --external (used when the input
has external data) the output is saved with save_as_external_data=True into one
side file OUT.onnx.data; otherwise as one file.
"""

import os
import sys

import onnx


def main(argv):
    external = "--external" in argv
    args = [a for a in argv if a != "--external"]
    if len(args) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    src, dst = args
    model = onnx.load(src)
    if external:
        onnx.save_model(
            model,
            dst,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=os.path.basename(dst) + ".data",
        )
    else:
        onnx.save_model(model, dst)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

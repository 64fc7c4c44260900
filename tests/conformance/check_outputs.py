#!/usr/bin/env python3
"""Conformance of models written by `onnx-micronet optimize`, for tests/suite/conformance.rs.

    python check_outputs.py MANIFEST.json

MANIFEST is a JSON list of cases: {"name", "model", "images", "tract"} where `images`
is a .npy of the preprocessed input batch (N, C, H, W float32) and `tract` a .npy of
tract's first output on it (N, K). For each case, in this one process:

  1. onnx.checker.check_model(model path, full_check=True) (a path, so external data
     and the 2 GiB rule are handled as onnx does);
  2. an onnxruntime InferenceSession on the file (CPU, one thread), run on the whole
     batch with graph optimizations off (the graph as written), and once more at the
     default settings a user's session has (all optimizations: constant folding, QDQ
     fusions into integer kernels, and, from 1.21, the re-quantization of float weights
     between Q/DQ activations);
  3. both of onnxruntime's outputs compared with tract's.

Prints one JSON object: {name: {"checker": "ok" | error, "ort": "ok" | error,
"max_abs_diff", "max_abs_ref", "top1_agree", "max_abs_diff_ort_optimized",
"top1_agree_ort_optimized", "n", "classes"}}. Never raises on a
case: every failure is reported for the Rust side to assert on.
"""

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def run(model, x, level):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = level
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.asarray(s.run(None, {name: x})[0], dtype=np.float32).reshape(len(x), -1)


def check(case):
    r = {"checker": "ok", "ort": "ok"}
    try:
        onnx.checker.check_model(case["model"], full_check=True)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        r["checker"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
    x = np.load(case["images"])
    try:
        y = run(case["model"], x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        # A user's session: every graph optimization onnxruntime applies by default.
        y_opt = run(case["model"], x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    except Exception as e:  # noqa: BLE001
        r["ort"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        return r
    t = np.load(case["tract"]).astype(np.float32).reshape(len(x), -1)
    if t.shape != y.shape or t.shape != y_opt.shape:
        r["ort"] = f"output shape {y.shape} / {y_opt.shape} (optimized), tract {t.shape}"
        return r
    r["top1_agree_ort_optimized"] = int(np.sum(np.argmax(y_opt, 1) == np.argmax(t, 1)))
    r["max_abs_diff_ort_optimized"] = float(np.max(np.abs(y_opt - t)))
    r["max_abs_diff"] = float(np.max(np.abs(y - t)))
    r["max_abs_ref"] = float(np.max(np.abs(t)))
    r["top1_agree"] = int(np.sum(np.argmax(y, 1) == np.argmax(t, 1)))
    r["n"] = int(len(x))
    r["classes"] = int(len(np.unique(np.argmax(t, 1))))
    return r


def main():
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    out = {c["name"]: check(c) for c in cases}
    json.dump(out, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

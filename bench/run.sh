#!/usr/bin/env bash
# `make bench`: time and peak memory of `onnx-micronet convert` against a plain
# prost round trip (examples/plain_roundtrip.rs) and Python's onnx.load + onnx.save.
#
#   make venv && bench/run.sh          (or simply: make bench)
#
# Environment:
#   ONNX_MICRONET_VENV  the venv with onnx, onnxruntime, numpy (default: .venv, made by `make venv`)
#   BENCH_REPEAT        timed runs per command (default 5; plus one warm-up run)
#   BENCH_NO_BUILD=1    do not run cargo; use the binaries already in target/release
#   CARGO               cargo command (default cargo)
#
# Writes everything under bench/out/ (git-ignored): the generated ResNet-50 models
# (made once, reused), the outputs of the runs, and results.md (the table, also
# printed). Exits non-zero if a command fails or if our output differs from the input.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="$ROOT/bench/out"
VENV="${ONNX_MICRONET_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
REPEAT="${BENCH_REPEAT:-5}"
CARGO="${CARGO:-cargo}"
BIN="$ROOT/target/release/onnx-micronet"
PLAIN="$ROOT/target/release/examples/plain_roundtrip"

fail() { echo "bench: $*" >&2; exit 1; }

[[ "$REPEAT" =~ ^[1-9][0-9]*$ ]] || fail "BENCH_REPEAT must be a positive integer (got '$REPEAT')"
[[ "$(uname -s)" == Linux ]] || fail "needs Linux (peak RSS comes from wait4 rusage, the machine description from /proc)"

[[ -x "$PY" ]] || fail "no python at $PY: run 'make venv' first (or set ONNX_MICRONET_VENV)"
"$PY" -c 'import onnx, onnxruntime, numpy' 2>/dev/null \
    || fail "$PY cannot import onnx, onnxruntime and numpy: run 'make venv' (or 'make clean-venv venv')"

# The binary and the baseline, from the same sources, optimised. A no-op when up to date;
# Cargo may print "Blocking waiting for file lock" while another build runs: it waits.
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    echo "bench: cargo build --release --locked --bin onnx-micronet --example plain_roundtrip" >&2
    "$CARGO" build --release --locked --bin onnx-micronet --example plain_roundtrip \
        || fail "the release build failed (see above)"
fi
[[ -x "$BIN" ]] || fail "$BIN is missing: run 'cargo build --release'"
[[ -x "$PLAIN" ]] || fail "$PLAIN is missing: run 'cargo build --release --example plain_roundtrip'"

mkdir -p "$OUT"
echo "bench: generating the ResNet-50 models into bench/out/ (once; reused afterwards)" >&2
"$PY" "$ROOT/bench/gen_resnet50.py" --out-dir "$OUT" >&2 || fail "bench/gen_resnet50.py failed"

echo "bench: measuring ($REPEAT runs per command; this takes a few minutes)" >&2
"$PY" "$ROOT/bench/bench.py" --root "$ROOT" --out-dir "$OUT" --bin "$BIN" --plain "$PLAIN" \
    --python "$PY" --repeat "$REPEAT"
echo "bench: inference throughput (validate vs onnxruntime)" >&2
"$PY" "$ROOT/bench/validate_speed.py"

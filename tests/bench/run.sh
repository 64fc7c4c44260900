#!/usr/bin/env bash
# `make bench`: time and peak memory of `onnx-micronet convert`, `score` and `optimize`
# (fold only; fold + prune + quantize + pack as far as they exist) against a plain prost
# round trip (tests/bench/plain_roundtrip.rs) and, in the same run, Python's onnx.load +
# onnx.save, onnxoptimizer's fuse_bn_into_conv and onnxruntime's quantize_dynamic; on the
# fixtures, a generated ResNet-50 with unfused BN, and a generated model over 2 GiB; then
# inference throughput against onnxruntime (validate_speed.py) and calibration speed
# against onnxruntime quantize_static and a plain tract run (calib_speed.py).
#
#   make venv && tests/bench/run.sh          (or simply: make bench)
#
# Environment:
#   ONNX_MICRONET_VENV  the venv with onnx, onnxruntime, numpy (default: .venv, made by `make venv`)
#   BENCH_REPEAT        timed runs per command (default 5; plus one warm-up run)
#   BENCH_NO_BUILD=1    do not run cargo; use the binaries already in target/release
#   BENCH_BIG=0         skip the generated model over 2 GiB (made and deleted by each run)
#   CARGO               cargo command (default cargo)
#
# Writes everything under tests/bench/out/ (git-ignored): the generated ResNet-50 models
# (made once, reused), the outputs of the runs, and results.md (the table, also
# printed). Exits non-zero if a command fails or if our output differs from the input.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="$ROOT/tests/bench/out"
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
# onnxoptimizer (bench only), on top of the conformance pins (used as constraints).
BENCH_STAMP="$VENV/.bench-$(cksum < "$ROOT/tests/bench/requirements.txt" | cut -d' ' -f1)"
if [[ ! -e "$BENCH_STAMP" ]]; then
    "$PY" -m pip install --quiet --disable-pip-version-check -r "$ROOT/tests/bench/requirements.txt" \
        -c "$ROOT/tests/conformance/requirements.txt" || fail "pip install -r tests/bench/requirements.txt failed"
    touch "$BENCH_STAMP"
fi

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
echo "bench: generating the ResNet-50 models into tests/bench/out/ (once; reused afterwards)" >&2
"$PY" "$ROOT/tests/bench/gen_resnet50.py" --out-dir "$OUT" >&2 || fail "tests/bench/gen_resnet50.py failed"

# The model over 2 GiB (external data): made for this run and deleted afterwards, when
# the disk has room for it and its outputs (BENCH_BIG=0 skips it).
BIG_ARGS=()
if [[ "${BENCH_BIG:-1}" == 1 ]]; then
    free_kib=$(df -Pk "$OUT" | awk 'NR==2 {print $4}')
    if (( free_kib > 12 * 1024 * 1024 )); then
        echo "bench: generating the 2.25 GiB external-data model into tests/bench/out/big/ (deleted after the run)" >&2
        "$PY" "$ROOT/tests/bench/gen_big.py" --out-dir "$OUT/big" >&2 || fail "tests/bench/gen_big.py failed"
        BIG_ARGS=(--big)
        trap 'rm -rf "$OUT/big" "$OUT/run/big"' EXIT
    else
        echo "bench: skipping the 2 GiB model: less than 12 GiB free under $OUT" >&2
    fi
fi

echo "bench: measuring ($REPEAT runs per command; this takes a few minutes)" >&2
"$PY" "$ROOT/tests/bench/bench.py" --root "$ROOT" --out-dir "$OUT" --bin "$BIN" --plain "$PLAIN" \
    --python "$PY" --repeat "$REPEAT" "${BIG_ARGS[@]}"
echo "bench: inference throughput (validate vs onnxruntime)" >&2
"$PY" "$ROOT/tests/bench/validate_speed.py"
echo "bench: calibration speed (ours vs a plain tract run vs onnxruntime quantize_static)" >&2
"$PY" "$ROOT/tests/bench/calib_speed.py"

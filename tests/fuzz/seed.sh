#!/usr/bin/env bash
# Seeds the fuzz corpora with the small committed fixtures.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$here/../.."
for t in loader optimize; do
    mkdir -p "$here/corpus/$t"
    for f in mnist_ccexam.onnx cifar10_keras_bn.onnx efficientnet_style_bn.onnx mnist_ccexam_dynamo/model.onnx; do
        cp "$root/fixtures/$f" "$here/corpus/$t/$(echo "$f" | tr / _)"
    done
done

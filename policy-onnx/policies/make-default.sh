#!/bin/sh
# Rebuilds policy-onnx/policies/default.onnx (contract v2), bit for bit: the default settings of
# `tmoctl policy train` (seed 1) on the public M4A1 training sample (80 dialogues) for the
# paper's board (device-profiles/jetson-tx2.toml). Equivalent, same bytes:
#   tmoctl policy train --data ../shared/data/m4a1/m4a1-train.json \
#       --profile device-profiles/jetson-tx2.toml --out policy-onnx/policies/default.onnx
# The test policy-onnx/tests/default_policy.rs retrains in-process and compares the bytes.
set -eu
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
cargo run --release --quiet -p policy-onnx --example default_policy

#!/usr/bin/env bash
# Makes the shipped head m4a1-tasks.safetensors (the crate embeds it as DEFAULT_HEAD) from the
# questions of the M4A1 training dialogues and the hand-written supplementary set
# (task-classifier/data/supplementary-questions.jsonl, see data/README.md), with the default
# hyper-parameters. Training is
# deterministic: on the same CPU kernels the file comes out byte for byte the same (the test
# shipped_head_is_what_training_makes checks it).
#
# Needs the embedding model: tmoctl model fetch all-minilm-l6-v2
# TMOCTL overrides the command (default: cargo run -q -p tmoctl --).
set -euo pipefail
cd "$(dirname "$0")/../.."
tmoctl=${TMOCTL:-cargo run -q -p tmoctl --}
$tmoctl classifier train --data ../shared/data/m4a1/m4a1-train.json \
  --supplementary task-classifier/data/supplementary-questions.jsonl \
  --out task-classifier/heads/m4a1-tasks.safetensors

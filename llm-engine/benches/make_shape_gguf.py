#!/usr/bin/env python3
"""Writes an F16 GGUF with random weights and the real shapes of a model boards run, for speed
measurements (speed does not depend on the values); `llama-quantize` then makes the Q4_K_M file.

The tokenizer (GPT-2 BPE, vocabulary, merges, chat template) is copied from a GGUF given with
--tokenizer-from (the shipped SmolLM2), its vocabulary padded with unused tokens up to the
model's size, so that the embedding and output matrices have the real model's shape.

    python3 llm-engine/benches/make_shape_gguf.py --shape qwen2.5-0.5b \
        --tokenizer-from ~/.cache/tmo-edge/models/SmolLM2-135M-Instruct.Q4_1.gguf --out q.gguf

Needs the `gguf` package from PyPI (scripts/board-size-bench installs it).
"""

import argparse

import gguf
import numpy as np

# The shapes of the published models' config.json files.
QWEN25 = dict(arch="qwen2", vocab=151936, rope_base=1_000_000.0, eps=1e-6, qkv_bias=True, tied=True)
LLAMA32 = dict(arch="llama", vocab=128256, rope_base=500_000.0, eps=1e-5, qkv_bias=False, tied=True)
SHAPES = {
    "qwen2.5-0.5b": dict(QWEN25, hidden=896, layers=24, heads=14, kv_heads=2, ffn=4864),
    "qwen2.5-1.5b": dict(QWEN25, hidden=1536, layers=28, heads=12, kv_heads=2, ffn=8960),
    "llama-3.2-1b": dict(LLAMA32, hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192),
    "llama-3.2-3b": dict(LLAMA32, hidden=3072, layers=28, heads=24, kv_heads=8, ffn=8192),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--tokenizer-from", required=True, help="a GGUF with a gpt2 BPE tokenizer")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    s = SHAPES[args.shape]
    head_dim = s["hidden"] // s["heads"]
    rng = np.random.default_rng(args.seed)

    source = gguf.GGUFReader(args.tokenizer_from)
    fields = source.fields
    if fields["tokenizer.ggml.model"].contents() != "gpt2":
        raise SystemExit(f"{args.tokenizer_from}: not a gpt2 BPE tokenizer")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    if len(tokens) > s["vocab"]:
        raise SystemExit(f"the tokenizer has {len(tokens)} tokens, more than the model's {s['vocab']}")
    pad = s["vocab"] - len(tokens)
    tokens = tokens + [f"<|unused_{i}|>" for i in range(pad)]
    types = types + [int(gguf.TokenType.UNUSED)] * pad

    w = gguf.GGUFWriter(args.out, s["arch"])
    w.add_name(f"random-weight {args.shape} (shape only)")
    w.add_context_length(4096)
    w.add_embedding_length(s["hidden"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_freq_base(s["rope_base"])
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(s["eps"])
    w.add_vocab_size(s["vocab"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(fields["tokenizer.ggml.pre"].contents())
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(fields["tokenizer.ggml.merges"].contents())
    for key, add in [
        ("tokenizer.ggml.bos_token_id", w.add_bos_token_id),
        ("tokenizer.ggml.eos_token_id", w.add_eos_token_id),
        ("tokenizer.ggml.unknown_token_id", w.add_unk_token_id),
        ("tokenizer.ggml.padding_token_id", w.add_pad_token_id),
        ("tokenizer.ggml.add_bos_token", w.add_add_bos_token),
        ("tokenizer.chat_template", w.add_chat_template),
    ]:
        if key in fields:
            add(fields[key].contents())

    def matrix(rows, cols):
        # Values of a trained model's scale; the quantizer sees ordinary blocks.
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    def ones(n):
        return np.ones(n, dtype=np.float32)

    d, kv = s["hidden"], s["kv_heads"] * head_dim
    w.add_tensor("token_embd.weight", matrix(s["vocab"], d))
    for i in range(s["layers"]):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", ones(d))
        for name, rows in [("attn_q", d), ("attn_k", kv), ("attn_v", kv)]:
            w.add_tensor(f"{b}.{name}.weight", matrix(rows, d))
            if s["qkv_bias"]:
                w.add_tensor(f"{b}.{name}.bias", (rng.standard_normal(rows, dtype=np.float32) * 0.02))
        w.add_tensor(f"{b}.attn_output.weight", matrix(d, d))
        w.add_tensor(f"{b}.ffn_norm.weight", ones(d))
        w.add_tensor(f"{b}.ffn_gate.weight", matrix(s["ffn"], d))
        w.add_tensor(f"{b}.ffn_up.weight", matrix(s["ffn"], d))
        w.add_tensor(f"{b}.ffn_down.weight", matrix(d, s["ffn"]))
    w.add_tensor("output_norm.weight", ones(d))
    if not s["tied"]:
        w.add_tensor("output.weight", matrix(s["vocab"], d))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""llama.cpp anchor for `tmoctl bench llm`: the same GGUF, thread count, prompt text and lengths.

Setup (builds llama.cpp, 5-10 minutes):
    python3 -m venv /opt/llmbench-venv && /opt/llmbench-venv/bin/pip install llama-cpp-python
Run:
    /opt/llmbench-venv/bin/python llm-engine/benches/llama_cpp_bench.py MODEL.gguf \
        --threads 2 --prompt-tokens 200 --gen-tokens 128
Prints load time, resident memory, time to first token (prompt pass + first greedy token)
and decode tokens/s (greedy, end-of-turn ignored), best and median over the runs.
"""

import argparse
import os
import statistics
import time

import numpy as np
from llama_cpp import Llama

# Must stay identical to PROMPT_TEXT in tmoctl/src/bench.rs.
PROMPT_TEXT = (
    "In a busy kitchen the cook keeps the knives sharp, the boards clean "
    "and the stock simmering slowly on the back burner. Onions are sliced thin and softened in butter "
    "until golden, garlic is added at the end so it does not burn, and a splash of white wine lifts "
    "the fond from the bottom of the pan. "
)


def rss_mib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    before = rss_mib()
    started = time.perf_counter()
    llm = Llama(
        model_path=args.model,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=2048,
        n_batch=512,
        use_mmap=True,
        verbose=False,
    )
    load = time.perf_counter() - started
    after = rss_mib()
    file_mib = os.path.getsize(args.model) / (1024.0 * 1024.0)
    print(f"model        {args.model}")
    print(f"threads      {args.threads}")
    print(f"load         {load:.3f} s")
    print(
        f"resident     {after:.1f} MiB after load ({before:.1f} MiB before), "
        f"file {file_mib:.1f} MiB, ratio {after / file_mib:.2f}"
    )

    prompt = []
    one = llm.tokenize(PROMPT_TEXT.encode(), add_bos=False, special=False)
    while len(prompt) < args.prompt_tokens:
        prompt.extend(one)
    prompt = prompt[: args.prompt_tokens]

    ttfts, decodes = [], []
    for run in range(args.runs + 1):
        llm.reset()
        llm._ctx.kv_cache_clear()
        started = time.perf_counter()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        first = time.perf_counter()
        for _ in range(args.gen_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        end = time.perf_counter()
        ttft = (first - started) * 1e3
        decode = (args.gen_tokens - 1) / (end - first)
        if run == 0:
            continue
        print(
            f"run {run}        prompt {len(prompt)} tokens, first token {ttft:.1f} ms, "
            f"{args.gen_tokens} generated at {decode:.1f} tokens/s, wall {end - started:.2f} s"
        )
        ttfts.append(ttft)
        decodes.append(decode)
    print(
        f"first token  {min(ttfts):.1f} ms best, {statistics.median(ttfts):.1f} ms median "
        f"({args.prompt_tokens} prompt tokens)"
    )
    print(
        f"decode       {max(decodes):.1f} tokens/s best, {statistics.median(decodes):.1f} median "
        f"({args.gen_tokens} tokens)"
    )


if __name__ == "__main__":
    main()

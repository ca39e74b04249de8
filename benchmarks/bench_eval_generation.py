"""Evaluation's generation: batched greedy answers against a loop of chat() calls, measured in one run.

    python benchmarks/bench_eval_generation.py [--examples 64] [--batch-size 16] [--max-new-tokens 32]

Both answer the same chat prompts (the quickstart's kind of question, with its
system prompt) with the same tiny built-in model, greedily, up to the same
number of new tokens:

  * baseline: ``model.reply(messages, temperature=0)`` once per example, which is
    what ``job.chat`` does and what a hand-written evaluation loop costs;
  * ``model.replies(prompts, batch_size=N)``: what ``job.evaluate`` uses, a batch
    left-padded into one ``generate`` call with its KV cache.

Prints examples per second for each and the ratio (target: at least 4x at batch
16 on a 2-core CPU), and checks that both give the same answers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("TUNING_MAGICS_HOME", tempfile.mkdtemp(prefix="tm-bench-eval-"))

    from tuning_magics.backends.local.generate import LocalChatModel

    model = LocalChatModel("local/tiny-qwen3")
    countries = ["Zorvia", "Quellan", "Brastov", "Miravel", "Okkaru", "Tessaly", "Vundra", "Pelmoor"]
    topics = ["capital", "river", "currency", "dish", "animal", "colour", "sport", "poet"]
    prompts = [[{"role": "system", "content": "Answer in one sentence."},
                {"role": "user", "content": f"What is the {topics[i // 8 % 8]} of {countries[i % 8]}?"}]
               for i in range(args.examples)]
    model.replies(prompts[:2], max_new_tokens=4, batch_size=2)  # warm-up: first-call costs out of both timings

    start = time.perf_counter()
    looped = [model.reply(p, temperature=0, max_new_tokens=args.max_new_tokens) for p in prompts]
    loop_s = time.perf_counter() - start

    start = time.perf_counter()
    batched = model.replies(prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    batch_s = time.perf_counter() - start

    same = sum(a == b for a, b in zip(looped, batched))
    print(f"examples: {args.examples}, max_new_tokens: {args.max_new_tokens}, model: local/tiny-qwen3, "
          f"threads: {__import__('torch').get_num_threads()}")
    print(f"loop of chat() calls (baseline): {args.examples / loop_s:8.1f} examples/s  ({loop_s:.2f} s)")
    print(f"replies(batch_size={args.batch_size}):        {args.examples / batch_s:8.1f} examples/s  ({batch_s:.2f} s)")
    print(f"ratio: {loop_s / batch_s:.1f}x (target >= 4x); identical answers: {same}/{args.examples}")


if __name__ == "__main__":
    main()

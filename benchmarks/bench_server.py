"""Latency of a short request sent while a long one is generating, on the local OpenAI-compatible server.

    python benchmarks/bench_server.py [--long 800] [--repeat 3]

The untuned ``local/tiny-qwen3`` never ends a reply by itself, so a request runs
to its ``max_tokens``. Baselines, measured in the same run: the short request
alone, and the long request alone (what a short request waits for on a server
that serves one request at a time). Target: under load the short request takes
at most a quarter of the long one's time (it takes turns, it does not queue).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request


def _ask(url: str, max_tokens: int) -> float:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(url + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        resp.read()
    return time.perf_counter() - t


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", type=int, default=800, help="max_tokens of the long request")
    parser.add_argument("--short", type=int, default=8, help="max_tokens of the short request")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    from tuning_magics.backends.local.generate import LocalChatModel
    from tuning_magics.backends.local.server import serve

    with serve(LocalChatModel("local/tiny-qwen3")) as srv:
        _ask(srv.url, args.short)  # warm-up
        short_alone = statistics.median(_ask(srv.url, args.short) for _ in range(args.repeat))
        long_alone = statistics.median(_ask(srv.url, args.long) for _ in range(args.repeat))
        under_load, long_loaded = [], []
        for _ in range(args.repeat):
            took: list[float] = []
            thread = threading.Thread(target=lambda: took.append(_ask(srv.url, args.long)))
            thread.start()
            time.sleep(long_alone / 10)  # the long request is well under way
            under_load.append(_ask(srv.url, args.short))
            thread.join()
            long_loaded.append(took[0])
    short_load, long_load = statistics.median(under_load), statistics.median(long_loaded)
    ratio = short_load / long_alone
    print(f"short request alone ({args.short} tokens):     {short_alone * 1000:8.1f} ms")
    print(f"long request alone ({args.long} tokens):      {long_alone * 1000:8.1f} ms  (baseline: one at a time)")
    print(f"short request during the long one:    {short_load * 1000:8.1f} ms")
    print(f"long request with the short one:      {long_load * 1000:8.1f} ms")
    print(f"ratio short-under-load / long-alone:  {ratio:8.3f}   (target <= 0.250)")
    return 0 if ratio <= 0.25 else 1


if __name__ == "__main__":
    raise SystemExit(main())

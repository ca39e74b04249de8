"""Latency of a short request sent while a long one is generating, on the local OpenAI-compatible server.

    python benchmarks/bench_server.py [--long 800] [--repeat 3] [--heavy 8]

Then the time to the 400 of prompts that cannot fit: 10,000 short messages, and
a body near the 2 MB limit, each sent ``--heavy`` times at once while a short
request is sent meanwhile. Baseline: encoding the whole of that prompt in the
same process (what a server that tokenises every prompt whole pays per request).

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


def _post(url: str, body: dict) -> tuple[int, float]:
    import urllib.error

    req = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        exc.read()
        status = exc.code
    return status, time.perf_counter() - t


def oversized(srv, heavy: int) -> bool:
    """Time to the 4xx of prompts that cannot fit, ``heavy`` at once, with a short request meanwhile."""
    cm = srv.chat_model
    ok = True
    for label, content in (("10,000 messages", "hi"), ("10,000 messages, near 2 MB", "x" * 160)):
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": content} for i in range(10_000)]
        body = {"messages": messages}
        size = len(json.dumps(body)) / 1e6
        t = time.perf_counter()
        len(cm.tokenizer(cm.render(messages), add_special_tokens=False, verbose=False)["input_ids"])
        whole = time.perf_counter() - t
        alone = _post(srv.url, body)
        results: list[tuple[int, float]] = []
        threads = [threading.Thread(target=lambda: results.append(_post(srv.url, body))) for _ in range(heavy)]
        for th in threads:
            th.start()
        short = _post(srv.url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        for th in threads:
            th.join()
        worst = max(d for _, d in results)
        statuses = sorted({s for s, _ in results} | {alone[0]})
        print(f"{label} ({size:.2f} MB): 4xx alone {alone[1] * 1000:7.1f} ms, slowest of {heavy} at once "
              f"{worst * 1000:7.1f} ms (status {statuses}); short request meanwhile {short[1] * 1000:7.1f} ms "
              f"(status {short[0]}); baseline, encoding it whole: {whole * 1000:7.1f} ms")
        ok = ok and all(400 <= s < 500 for s in statuses) and short[0] == 200 and worst < 5.0
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", type=int, default=800, help="max_tokens of the long request")
    parser.add_argument("--short", type=int, default=8, help="max_tokens of the short request")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--heavy", type=int, default=8, help="oversized requests sent at once")
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
        oversized_ok = oversized(srv, args.heavy)
    short_load, long_load = statistics.median(under_load), statistics.median(long_loaded)
    ratio = short_load / long_alone
    print(f"short request alone ({args.short} tokens):     {short_alone * 1000:8.1f} ms")
    print(f"long request alone ({args.long} tokens):      {long_alone * 1000:8.1f} ms  (baseline: one at a time)")
    print(f"short request during the long one:    {short_load * 1000:8.1f} ms")
    print(f"long request with the short one:      {long_load * 1000:8.1f} ms")
    print(f"ratio short-under-load / long-alone:  {ratio:8.3f}   (target <= 0.250)")
    return 0 if ratio <= 0.25 and oversized_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

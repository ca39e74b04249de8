"""DataFrame -> validated JSONL: speed and memory against plain baselines, measured in one run.

    python benchmarks/bench_dataset.py [--rows 1000000] [--small-only]

The small case is what a notebook cell does: ``%dataset`` on a 64-row DataFrame
for ``local/tiny-qwen3``, the report rendered (HTML with its histogram PNG, and
text), cold (a fresh Python: imports included) and warm (the same call again).
Its baseline is pandas rendering the same DataFrame as HTML. Target: warm well
under a second.

Baselines, on the same 3-turn chat data:
  * a plain loop of ``json.dumps`` over the already-built records, no validation;
  * ``DataFrame.to_json(orient="records", lines=True)`` of the same columns.
``tuning_magics.dataset`` is timed from the DataFrame, validation and token
statistics included. Extra peak memory while writing is measured with
tracemalloc and compared with the DataFrame's own deep size.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
import tracemalloc


def make_frame(rows: int, seed: int = 0):
    import pandas as pd

    rng = random.Random(seed)
    words = ("the model answers questions about tuning datasets quickly and well with short replies "
             "from a notebook cell while loss curves fall and the chat panel shows \"quoted\" text\n").split(" ")
    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))
    systems = [text(5, 15) for _ in range(50)]
    return pd.DataFrame({
        "system": [systems[i % 50] for i in range(rows)],
        "user": [text(5, 40) for _ in range(rows)],
        "assistant": [text(10, 80) for _ in range(rows)],
    })


def records_of(df) -> list[dict]:
    return [
        {"messages": [{"role": "system", "content": s}, {"role": "user", "content": u},
                      {"role": "assistant", "content": a}]}
        for s, u, a in zip(df["system"], df["user"], df["assistant"])
    ]


class RssPeak:
    """Peak resident memory above the level at entry, sampled every few milliseconds.

    tracemalloc sees Python allocations only; this also sees pyarrow's and numpy's.
    """

    def __enter__(self):
        import threading

        self.base = self._rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def extra(self) -> int:
        return self.peak - self.base

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn):
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


SMALL_ROWS = 64

_SMALL = """
import time
start = time.perf_counter()
import pandas as pd
import tuning_magics as tm
imported = time.perf_counter()
df = pd.DataFrame({{"question": [f"What is the capital of country {{i}}?" for i in range({rows})],
                   "answer": [f"The capital of country {{i}} is city {{i}}." for i in range({rows})]}})
def cell(out):
    ds = tm.dataset(df, out=out, prompt="question", completion="answer", system_prompt="Answer in one sentence.",
                    model="local/tiny-qwen3", epochs=3, overwrite=True)
    return ds._repr_html_(), repr(ds)
"""


def small_case(tmp: str) -> dict:
    """``%dataset`` on a 64-row DataFrame with its report rendered: cold (a fresh process) and warm."""
    import statistics
    import subprocess

    out = os.path.join(tmp, "small.jsonl")
    cold_code = _SMALL.format(rows=SMALL_ROWS) + (
        f"first = time.perf_counter()\ncell({out!r})\ndone = time.perf_counter()\n"
        "print(imported - start, done - first)\n")
    colds = []
    for _ in range(3):
        run = subprocess.run([sys.executable, "-c", cold_code], check=True, capture_output=True, text=True)
        colds.append(tuple(map(float, run.stdout.split())))
    namespace: dict = {}
    exec(_SMALL.format(rows=SMALL_ROWS), namespace)  # noqa: S102 - the same code as the cold case
    cell, df = namespace["cell"], namespace["df"]
    cell(out)
    warm = []
    for _ in range(15):
        warm.append(timed(lambda: cell(out)))
    df.to_html()
    base = [timed(df.to_html) for _ in range(15)]
    html, _ = cell(out)
    return {"import": statistics.median(c[0] for c in colds), "cold": statistics.median(c[1] for c in colds),
            "warm": statistics.median(warm), "warm_max": max(warm), "to_html": statistics.median(base),
            "html_bytes": len(html)}


def print_small(r: dict) -> bool:
    print(f"%dataset, {SMALL_ROWS} rows, local/tiny-qwen3, report rendered (HTML + PNG histogram + text):")
    print(f"  cold, fresh process: import tuning_magics {r['import']:6.3f} s + first call {r['cold']:6.3f} s")
    print(f"  warm (median of 15):                         {r['warm']:6.3f} s   (slowest {r['warm_max']:.3f} s)")
    print(f"  DataFrame.to_html() of the same rows:        {r['to_html']:6.3f} s   "
          f"(warm call = {r['warm'] / r['to_html']:.1f}x it)")
    ok = r["warm"] < 0.25
    print(f"  target: warm well under a second (< 0.25 s): {'PASS' if ok else 'FAIL'}")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--memory-only", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--small-only", action="store_true", help="run only the 64-row notebook-cell case")
    args = parser.parse_args(argv)
    if args.small_only:
        with tempfile.TemporaryDirectory() as tmp:
            return 0 if print_small(small_case(tmp)) else 1
    import tuning_magics as tm

    df = make_frame(args.rows)
    if args.memory_only:
        tm.dataset(df.head(100), args.memory_only + ".warm", system="system", user="user", assistant="assistant")
        gc.collect()
        rss = RssPeak()
        tracemalloc.start()
        with rss:
            tm.dataset(df, args.memory_only, system="system", user="user", assistant="assistant", overwrite=True)
        _, peak = tracemalloc.get_traced_memory()
        print(peak, rss.extra)
        return 0
    frame_bytes = int(df.memory_usage(deep=True).sum())
    records = records_of(df)
    with tempfile.TemporaryDirectory() as tmp:
        def plain_loop():
            with open(os.path.join(tmp, "loop.jsonl"), "w", encoding="utf-8") as fh:
                for r in records:
                    fh.write(json.dumps(r) + "\n")

        def to_json():
            df.to_json(os.path.join(tmp, "to_json.jsonl"), orient="records", lines=True)

        def ours(name="ours.jsonl"):
            return tm.dataset(df, os.path.join(tmp, name), system="system", user="user",
                              assistant="assistant", overwrite=True)

        small = small_case(tmp)
        t_loop = timed(plain_loop)
        t_to_json = timed(to_json)
        result = []
        t_ours = timed(lambda: result.append(ours()))
        ds = result[0]
        records.clear()
        # Memory is measured in a fresh process: this one's allocator still holds
        # what the baselines freed, which would hide growth from the RSS reading.
        import subprocess

        out = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--memory-only",
                              os.path.join(tmp, "ours-mem.jsonl")], check=True, capture_output=True, text=True)
        peak, rss_extra = map(int, out.stdout.split())
        size = os.path.getsize(os.path.join(tmp, "ours.jsonl"))
        # The output must be what the baseline writes, byte for byte modulo JSON spacing.
        with open(os.path.join(tmp, "ours.jsonl"), "rb") as a, open(os.path.join(tmp, "loop.jsonl"), "rb") as b:
            import orjson
            for _ in range(1000):
                assert orjson.loads(a.readline()) == json.loads(b.readline())

    print(f"rows: {args.rows:,}   DataFrame: {frame_bytes / 2**20:,.0f} MiB   JSONL: {size / 2**20:,.0f} MiB")
    print(f"json.dumps loop (no validation):     {t_loop:7.2f} s")
    print(f"DataFrame.to_json(lines=True):       {t_to_json:7.2f} s")
    print(f"tuning_magics.dataset (validated):   {t_ours:7.2f} s   ({ds.examples:,} examples, "
          f"{ds.tokens['total']:,} tokens)")
    print(f"speed-up vs json.dumps loop:         {t_loop / t_ours:7.2f}x   (target >= 2x)")
    print(f"speed-up vs DataFrame.to_json:       {t_to_json / t_ours:7.2f}x   (target > 1x)")
    print(f"extra peak memory while writing:     {peak / 2**20:7.0f} MiB = {peak / frame_bytes:.2f} x DataFrame "
          f"(Python allocations, tracemalloc; target < 1x)")
    print(f"extra peak resident memory:          {rss_extra / 2**20:7.0f} MiB = {rss_extra / frame_bytes:.2f} x DataFrame "
          f"(all allocations, RSS; target < 1x)")
    ok = t_loop / t_ours >= 2 and t_to_json / t_ours > 1 and max(peak, rss_extra) < frame_bytes
    ok = print_small(small) and ok
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""What the job monitor costs, measured while a real local job trains (``local/tiny-qwen3`` on CPU).

    python benchmarks/bench_monitor.py            # prints a table; --append adds it to benchmarks/RESULTS.md

Four jobs of the same size run one after another in a fresh data folder:

1. baseline: no monitor; a trivial cell runs every 50 ms in an in-process IPython shell;
2. monitored: a ``JobMonitor`` follows the job from its background thread (as in a notebook),
   and the same trivial cells run meanwhile;
3. baseline again (so drift of a shared machine shows);
4. alternating: one job, with a monitor following it in every other 4-second window; the
   steps of the windows with and without it are compared (the same job, so a shared
   machine's drift between jobs does not enter the ratio);
5. redraws: a monitor whose job carries a 10,000-step history before the real steps is updated
   again and again, each update reading the job and redrawing the whole curve.

Reported: (a) one monitor update with a 10,000-point redraw, p50/p95 (target < 50 ms);
(b) training tokens/s (the median of the engine's per-step figures) with the monitor, against
the windows without it in run 4 (target: under 5% lower), and, for context, run 2 against the
mean of runs 1 and 3; (c) a trivial cell's
time (``run_cell``) p95, with and without the monitor (target < 100 ms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

MODEL = "local/tiny-qwen3"
TARGET_UPDATE_MS = 50
TARGET_COST = 0.05
TARGET_CELL_MS = 100
#: Seconds of each window with, then without, a monitor in the alternating run.
WINDOW = 4.0


def records(n: int) -> list[dict]:
    filler = " and so on" * 20
    return [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}{filler}."} for i in range(n)]


def pct(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_job(tm, shell, *, examples: int, epochs: int, monitor: str | None):
    """Submit one job, run trivial cells (and updates) until it ends; (tokens/s, cell times, update times)."""
    job = tm.tune(MODEL, records(examples), epochs=epochs, batch_size=2)
    cells, updates = [], []
    mon = None
    while job.state not in ("JOB_STATE_RUNNING",) and not job.done:
        time.sleep(0.05)
    if monitor == "thread":
        from tuning_magics.display.monitor import JobMonitor

        mon = JobMonitor(job).start()
    elif monitor == "redraw":
        from tuning_magics.display.monitor import JobMonitor

        mon = JobMonitor(LongHistory.wrap(job))
    windows = []  # (first step, monitored) of each window of the alternating run
    switch = time.monotonic()
    if monitor == "alternate":
        windows.append((0, False))
    while not job.refresh().done:
        if monitor == "alternate" and time.monotonic() - switch >= WINDOW:
            switch = time.monotonic()
            on = not windows[-1][1]
            step = job.progress().step or 0
            windows.append((step + 1, on))
            if on:
                from tuning_magics.display.monitor import JobMonitor

                mon = JobMonitor(job).start()
            elif mon is not None:
                mon.stop()
        t0 = time.perf_counter()
        shell.run_cell("x = sum(range(1000))", store_history=False, silent=True)
        cells.append(time.perf_counter() - t0)
        if monitor == "redraw":
            mon._drawn = None  # draw the whole curve every time
            t0 = time.perf_counter()
            mon.update()
            updates.append(time.perf_counter() - t0)
        time.sleep(0.05)
    if mon is not None:
        mon.stop()
    assert job.state == "JOB_STATE_SUCCEEDED", job.error
    frame = job.metrics()
    tps = statistics.median(frame["tokens_per_second"].dropna())
    if monitor == "alternate":
        # A step is counted in a window only when it began well inside it (the switch step is left out).
        split = {True: [], False: []}
        for (first, on), (nxt, _) in zip(windows, windows[1:] + [(10**9, None)]):
            rows = frame[(frame["step"] > first) & (frame["step"] < nxt)]["tokens_per_second"].dropna()
            split[on] += list(rows)
        tps = (statistics.median(split[True]), statistics.median(split[False]), len(split[True]),
               len(split[False]))
    return tps, cells, updates, (mon.redraws if mon is not None else 0)


class LongHistory:
    """A real local job whose metrics carry 10,000 earlier steps before its own (read from its file each time)."""

    @staticmethod
    def wrap(job):
        import numpy as np
        import pandas as pd

        from tuning_magics.backends.local.jobs import LocalJob

        n = 10_000
        steps = np.arange(1, n + 1)
        rng = np.random.default_rng(0)
        history = pd.DataFrame({"step": steps, "epoch": steps / 1000,
                                "train_loss": 3 * np.exp(-steps / 3000) + rng.random(n) * 0.2,
                                "eval_loss": np.where(steps % 500 == 0, 2 * np.exp(-steps / 3000), np.nan),
                                "token_accuracy": np.linspace(0.1, 0.8, n)})

        class Long(LocalJob):
            def metrics(self):
                own = super().metrics()
                own = own.assign(step=own["step"] + n)
                return pd.concat([history, own], ignore_index=True)

        return Long(job.id)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)

    home = tempfile.mkdtemp(prefix="bench-monitor-")
    os.environ["TUNING_MAGICS_HOME"] = home
    from IPython.core.interactiveshell import InteractiveShell

    import tuning_magics as tm
    from tuning_magics.backends.local.models import tiny_model_path

    tiny_model_path(MODEL)
    shell = InteractiveShell.instance()
    print(f"data folder {home}; {args.examples} examples x {args.epochs} epochs, batch 2", flush=True)

    runs = {}
    for name, monitor, epochs in (("baseline", None, args.epochs), ("monitored", "thread", args.epochs),
                                  ("baseline 2", None, args.epochs), ("alternating", "alternate", 2 * args.epochs),
                                  ("redraws", "redraw", args.epochs)):
        t0 = time.perf_counter()
        runs[name] = run_job(tm, shell, examples=args.examples, epochs=epochs, monitor=monitor)
        tps, cells, updates, redraws = runs[name]
        speed = (f"{tps[0]:,.0f} tokens/s with / {tps[1]:,.0f} without ({tps[2]}/{tps[3]} steps)"
                 if isinstance(tps, tuple) else f"{tps:,.0f} tokens/s")
        print(f"{name:>11}: {time.perf_counter() - t0:5.1f} s, {speed}, {len(cells)} cells p95 "
              f"{pct(cells, .95) * 1000:.1f} ms" + (f", {len(updates)} updates" if updates else "")
              + (f", {redraws} redraws" if redraws else ""), flush=True)

    base_tps = statistics.mean([runs["baseline"][0], runs["baseline 2"][0]])
    mon_tps = runs["monitored"][0]
    with_tps, without_tps, n_with, n_without = runs["alternating"][0]
    cost = 1 - with_tps / without_tps
    updates = runs["redraws"][2]
    up50, up95 = pct(updates, .5) * 1000, pct(updates, .95) * 1000
    base_cells = runs["baseline"][1] + runs["baseline 2"][1]
    cell95, base_cell95 = pct(runs["monitored"][1], .95) * 1000, pct(base_cells, .95) * 1000
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    ok = up95 < TARGET_UPDATE_MS and cost < TARGET_COST and cell95 < TARGET_CELL_MS
    rows = [
        "| measure | value | target |",
        "|---|---|---|",
        f"| (a) one update with a 10,000-point redraw, p50 / p95 ({len(updates)} updates) | "
        f"{up50:.1f} ms / {up95:.1f} ms | < {TARGET_UPDATE_MS} ms |",
        f"| (b) training tokens/s in one job, windows with / without a monitor ({n_with} / {n_without} steps): "
        f"{with_tps:,.0f} / {without_tps:,.0f} | ratio {with_tps / without_tps:.3f} (cost {cost:+.1%}) | "
        f"cost < {TARGET_COST:.0%} |",
        f"| (b') for context, separate jobs: baselines {runs['baseline'][0]:,.0f} and {runs['baseline 2'][0]:,.0f}; "
        f"monitored {mon_tps:,.0f} | ratio {mon_tps / base_tps:.3f} | (drift between jobs) |",
        f"| (c) trivial cell p95: monitored / baseline | {cell95:.1f} ms / {base_cell95:.1f} ms "
        f"(ratio {cell95 / base_cell95:.2f}) | < {TARGET_CELL_MS} ms |",
    ]
    table = "\n".join(rows)
    print(table)
    print("PASS" if ok else "FAIL")
    if args.append:
        text = (f"\n## `bench_monitor.py`: the job monitor while a local job trains\n\n"
                f"`python benchmarks/bench_monitor.py --append` ({args.examples} examples x {args.epochs} epochs of "
                f"`{MODEL}`, batch 2, CPU; {os.cpu_count()} cores, load {load:.1f} at the end). Baseline: the same "
                "job with no monitor, run before and after the monitored one in the same process.\n\n"
                f"{table}\n\n{'PASS' if ok else 'FAIL'}.\n")
        with open(Path(__file__).with_name("RESULTS.md"), "a", encoding="utf-8") as fh:
            fh.write(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

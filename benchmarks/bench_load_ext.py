"""Cost of ``%load_ext tuning_magics`` against ``import vertexai``, each in a fresh process.

    python benchmarks/bench_load_ext.py [--repeat 5]

Target: loading the extension costs at most a tenth of importing vertexai.
Each measurement is the median wall time of ``--repeat`` fresh interpreters,
minus the median of an interpreter that only starts IPython's shell (for the
extension) or does nothing (for vertexai), so only the import itself counts.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

_SHELL = "from IPython.core.interactiveshell import InteractiveShell; ip = InteractiveShell.instance(); "
_TIMED = "import time; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"


def _measure(setup: str, code: str, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        script = setup + _TIMED.format(code=code)
        out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
        runs.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(runs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    load_ext = _measure(_SHELL, "ip.run_line_magic('load_ext', 'tuning_magics')", args.repeat)
    vertexai = _measure("", "import vertexai", args.repeat)
    ratio = load_ext / vertexai
    print(f"%load_ext tuning_magics: {load_ext * 1000:8.1f} ms (median of {args.repeat} fresh processes)")
    print(f"import vertexai:         {vertexai * 1000:8.1f} ms")
    print(f"ratio:                   {ratio:8.3f}   (target <= 0.100)")
    heavy = subprocess.run(
        [sys.executable, "-c", _SHELL + "ip.run_line_magic('load_ext', 'tuning_magics'); import sys; "
         "print(sorted(m for m in ('torch', 'transformers', 'vertexai', 'google.genai', 'google.cloud.storage', "
         "'matplotlib', 'pandas') if m in sys.modules))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    print(f"heavy modules imported by %load_ext: {heavy}")
    ok = ratio <= 0.1
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""GGUF export: time and file size against the model's safetensors folder, for the tiny models and a ~0.5B Qwen3.

    python benchmarks/bench_export.py             # the three built-in tiny models and a ~0.5B Qwen3-shaped model
    python benchmarks/bench_export.py --no-large  # the tiny models only

Each model is saved by the engine's ``"hf"`` export writer (float32 safetensors, its
tokenizer and generation config), then written as GGUF at each type with
:func:`tuning_magics.export_gguf.write_gguf`; every file is loaded by llama.cpp
(llama-cpp-python) and evaluates a prompt, so a size is only reported for a file that
works. Reported: the seconds to write, the file's size and its ratio to the
safetensors weights (the baseline, measured in the same run). Targets: f16 at most
0.55x the float32 weights and q8_0 at most 0.3x (the types' bits per weight, plus
the f32 norms and metadata).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"f16": 0.55, "q8_0": 0.3, "bf16": 0.55, "f32": 1.05}


def loads_and_runs(path: Path) -> bool:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    try:
        llm.eval(llm.tokenize(b"Hello there", add_bos=False))
        return True
    finally:
        llm.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-large", action="store_true", help="leave out the ~0.5B model")
    p.add_argument("--types", default="f16,q8_0", help="GGUF types, comma-separated (default f16,q8_0)")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-export-"))
    os.environ.setdefault("TUNING_MAGICS_HOME", str(root / "home"))
    sys.path.insert(0, str(Path(__file__).parent))
    from tuning_magics.backends.local.export import write
    from tuning_magics.backends.local.models import tiny_model_path
    from tuning_magics.export_gguf import write_gguf

    models = [("local/tiny-qwen3", None), ("local/tiny-llama", None), ("local/tiny-gemma3", None)]
    if not args.no_large:
        models.append(("Qwen3-shaped ~0.5B", "large"))
    rows, ok = [], True
    try:
        for name, kind in models:
            folder = root / name.replace("/", "-").replace(" ", "-")
            if kind == "large":
                from bench_engine import build_model

                source = root / "built"
                params = build_model(source, gpu=True, hidden=None, layers=None)  # Qwen3-0.6B's body, bytes vocab
            else:
                source = tiny_model_path(name)
                params = None
            folder.mkdir()
            write(Path(source), "hf", folder)
            if kind == "large":
                shutil.rmtree(source)
            if params is None:
                from tuning_magics.backends.local.memory import param_count
                from tuning_magics.backends.local.models import load_config

                params = param_count(load_config(str(folder)))
            weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            for kind_ in args.types.split(","):
                out = root / f"{folder.name}-{kind_}.gguf"
                t = time.perf_counter()
                write_gguf(folder, out, kind_)
                seconds = time.perf_counter() - t
                size = out.stat().st_size
                works = loads_and_runs(out)
                ratio = size / weights
                passed = works and ratio <= TARGETS[kind_]
                ok &= passed
                rows.append((name, params, kind_, seconds, weights, size, ratio, works, passed))
                out.unlink()
            shutil.rmtree(folder)
        print(f"{'model':22s} {'params':>8s} {'type':>5s} {'write s':>8s} {'safetensors':>12s} {'gguf':>10s} "
              f"{'ratio':>6s} {'llama.cpp':>9s}")
        for name, params, kind_, seconds, weights, size, ratio, works, passed in rows:
            print(f"{name:22s} {params / 1e6:7.1f}M {kind_:>5s} {seconds:8.2f} {weights / 1e6:10.1f}MB "
                  f"{size / 1e6:8.1f}MB {ratio:6.2f} {'runs' if works else 'FAILS':>9s}  "
                  f"{'PASS' if passed else 'FAIL'} (target <= {TARGETS[kind_]})")
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

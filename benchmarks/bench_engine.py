"""Training speed of the local engine against TRL's ``SFTTrainer``, in one process.

    python benchmarks/bench_engine.py                 # CPU: a ~3M-parameter Qwen3, ~250 chat examples
    python benchmarks/bench_engine.py --gpu           # CUDA: a ~0.5B Qwen3-like model in bf16, plus MFU

The engine itself runs on TRL's ``SFTTrainer``; what it adds is measured here: it
hands the trainer the rendered tokens and loss masks, in its own length-grouped
batches. Both sides get the same model (a Qwen3 config built here with the
project's byte-level tokenizer, saved once, so both start from the same weights),
the same chat data (lengths log-normal, from tens to about a thousand tokens), and
the same hyperparameters: epochs, learning rate and its schedule (TRL's default,
linear without warm-up, which the engine is given too), per-device batch size and
maximum length, and the same CPU threads.

The baseline is TRL's best stock CPU configuration: ``SFTConfig()`` with
``report_to="none"``, a temp ``output_dir``, ``save_strategy="no"`` (checkpoint
writing is pure I/O; the engine's checkpoint saves are likewise outside its timed
steps), ``gradient_checkpointing=False`` (the engine uses it only from 100M
parameters) and ``train_sampling_strategy="group_by_length"`` (its own
length-grouped sampler), and on CPU ``bf16=False`` (its default bf16 refuses to run
on a CPU). ``--trl-defaults`` adds a row for TRL with its defaults as they come
(gradient checkpointing, random batches). TRL sees the data as conversational
prompt/completion records, so it learns only the completion, as the engine does.

Reported: tokens/s (real, non-padding tokens per second of the training loop,
counted the same way for both: the attention mask of every batch), the speed
ratio (target >= 1.3x), the final training loss of each (both final models
re-scored with one loss function on the whole training set; target: within 1%),
and the share of processed tokens that were padding.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

SPEED_TARGET = 1.3
LOSS_TARGET = 0.01
H100_BF16_PEAK = 989e12

_WORDS = ["the", "model", "learns", "a", "short", "answer", "from", "every", "example", "while", "tokens", "flow", "through", "layers", "of", "attention", "and", "small", "matrices", "multiply", "on", "two", "cores", "so", "we", "count", "what", "was", "real", "and", "what", "was", "padding", "in", "each", "batch", "then", "compare", "loss", "and", "speed", "between", "both", "trainers", "on", "identical", "data", "with", "equal", "settings"]


def make_data(n: int, seed: int, max_len: int) -> list[dict]:
    """Chat examples whose lengths (in bytes = tokens) are log-normal: median ~150, from ~30 to ~1000."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        total = int(min(max_len - 40, max(30, rng.lognormvariate(5.0, 0.8))))
        prompt_len = max(8, int(total * rng.uniform(0.2, 0.5)))

        def text(k: int) -> str:
            words, size = [], 0
            # A repeating grammar (word i is often followed by word i+1) gives the loss something to learn.
            j = rng.randrange(len(_WORDS))
            while size < k:
                j = (j + 1) % len(_WORDS) if rng.random() < 0.7 else rng.randrange(len(_WORDS))
                words.append(_WORDS[j])
                size += len(_WORDS[j]) + 1
            return " ".join(words)[:k]

        out.append({"messages": [{"role": "user", "content": f"#{i}: " + text(prompt_len)},
                                 {"role": "assistant", "content": text(total - prompt_len)}]})
    return out


def build_model(folder: Path, *, gpu: bool, hidden: int | None, layers: int | None) -> int:
    """A Qwen3 with the project's tokenizer, saved to ``folder``; returns its parameter count."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tuning_magics.backends.local.models import save_model
    from tuning_magics.datasets.tokenizer import (
        BOS,
        IM_END,
        PAD,
        SPECIAL_TOKENS,
        VOCAB_SIZE,
        build_tokenizer,
    )

    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    if gpu:  # Qwen3-0.6B's body (hidden 1024, head_dim 128, MLP 3072) with a byte vocabulary: ~0.5B weights
        shape = {"hidden_size": hidden or 1024, "num_hidden_layers": layers or 32,
                 "intermediate_size": 3 * (hidden or 1024), "num_attention_heads": 16, "num_key_value_heads": 8,
                 "head_dim": 128}
    else:
        shape = {"hidden_size": hidden or 256, "num_hidden_layers": layers or 4,
                 "intermediate_size": 3 * (hidden or 256), "num_attention_heads": 4, "num_key_value_heads": 2,
                 "head_dim": 64}
    config = Qwen3Config(vocab_size=(VOCAB_SIZE + 15) // 16 * 16, max_position_embeddings=2048,
                         pad_token_id=ids[PAD], bos_token_id=ids[BOS], eos_token_id=ids[IM_END],
                         tie_word_embeddings=True, **shape)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    save_model(model, folder)
    build_tokenizer().save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def score(folder: str, examples: list[dict], max_len: int, device: str) -> float:
    """Mean completion-token cross-entropy of a saved model over ``examples`` (one function for both trainers)."""
    import torch

    from tuning_magics.backends.local import data as D
    from tuning_magics.backends.local.models import load_model_and_tokenizer
    from tuning_magics.backends.local.trainer import _loss_and_accuracy

    model, tok = load_model_and_tokenizer(folder, device=device)
    model.eval()
    enc, _ = D.encode_all(tok, [e["messages"] for e in examples], max_len)
    enc.sort(key=len)
    total, n = 0.0, 0
    with torch.no_grad():
        for j in range(0, len(enc), 8):
            ids, mask, labels, _ = D.collate(enc[j:j + 8], tok.pad_token_id)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            ls, k, _ = _loss_and_accuracy(logits, labels.to(device))
            total += float(ls)
            n += k
    del model
    return total / max(1, n)


def run_engine(model_dir: str, train_path: str, out: str, args, **options) -> dict:
    """The engine on the benchmark's job; ``options`` are engine options (``load_in_4bit=True`` with
    ``tuning_mode="PEFT_ADAPTER"``, ``kernels=True``, ``padding_free=True``...)."""
    from tuning_magics.backends.local.trainer import TrainConfig, train

    t = time.perf_counter()
    res = train(TrainConfig(base_model=model_dir, train_path=train_path, output_dir=out, epochs=args.epochs,
                            learning_rate=args.lr, batch_size=args.batch_size, max_seq_len=args.max_len,
                            lr_scheduler="linear", warmup_ratio=0.0,  # TRL's default schedule
                            check_memory=False, **options))
    wall = time.perf_counter() - t
    # The engine's own figure is the same definition as TRL's below: real (attention-mask) tokens
    # divided by the time of the training steps, checkpoint writing excluded.
    name = "engine" + "".join(f" {k}={v}" for k, v in options.items())
    return {"name": name, "tokens_per_s": res.tokens_per_second, "padding_share": res.padding_share,
            "reported_loss": res.train_loss, "final_dir": res.final_dir, "wall_s": wall, "steps": res.steps}


def run_trl(model_dir: str, examples: list[dict], out: str, args, *, stock_best: bool = True) -> dict:
    """TRL's SFTTrainer: its best stock CPU configuration (no gradient checkpointing, ``group_by_length``), or with
    ``stock_best=False`` its defaults as they come."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tuning_magics.backends.local.models import load_tokenizer

    records = [{"prompt": e["messages"][:-1], "completion": e["messages"][-1:]} for e in examples]
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    extra = {} if args.gpu else {"bf16": False}  # TRL's default bf16 refuses to start on a CPU
    if stock_best:
        extra.update(gradient_checkpointing=False, train_sampling_strategy="group_by_length")
    config = SFTConfig(output_dir=out, report_to="none", save_strategy="no", num_train_epochs=args.epochs,
                       learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
                       max_length=args.max_len, disable_tqdm=True, **extra)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(records), processing_class=tok)

    counts = {"real": 0, "padded": 0}
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        counts["padded"] += batch["input_ids"].numel()
        counts["real"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch \
            else batch["input_ids"].numel()
        return batch

    trainer.data_collator = counting
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # its per-log prints would bury the table
    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["t0"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            clock["t1"] = time.perf_counter()

    trainer.add_callback(Clock())
    t = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t
    final = Path(out) / "final"
    trainer.save_model(str(final))
    tok.save_pretrained(final)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    loop = clock["t1"] - clock["t0"]
    name = "TRL SFTTrainer" + (" (best stock: no checkpointing, by length)" if stock_best else " (defaults)")
    return {"name": name, "tokens_per_s": counts["real"] / loop,
            "padding_share": (counts["padded"] - counts["real"]) / max(1, counts["padded"]),
            "reported_loss": logged[-1] if logged else result.training_loss, "final_dir": str(final),
            "wall_s": wall, "steps": trainer.state.global_step, "real_tokens": counts["real"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="CUDA: ~0.5B Qwen3-like model in bf16, with MFU")
    p.add_argument("--examples", type=int, default=None, help="chat examples (default 256 CPU, 4000 GPU)")
    p.add_argument("--epochs", type=int, default=None, help="default 2 CPU, 1 GPU")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 CPU, 1e-4 GPU")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=None, help="override the model's hidden size")
    p.add_argument("--layers", type=int, default=None, help="override the model's layer count")
    p.add_argument("--peak-flops", type=float, default=H100_BF16_PEAK,
                   help="peak bf16 FLOP/s for MFU (default: H100/H200 dense, 989e12)")
    p.add_argument("--trl-defaults", action="store_true",
                   help="also run TRL with its defaults (gradient checkpointing, random batches)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both (default: every core this process may use); the engine alone would "
                        "take one for a model this small, the choice for a machine shared with a notebook")
    p.add_argument("--gpu-options", default="padding_free,kernels,load_in_4bit",
                   help="with --gpu: the engine's GPU options to add a row each for (QLoRA rows tune LoRA; a "
                        "machine with several GPUs adds gpus=N); '' for none")
    p.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = p.parse_args(argv)
    args.examples = args.examples or (4000 if args.gpu else 256)
    args.epochs = args.epochs or (1 if args.gpu else 2)
    args.lr = args.lr or (1e-4 if args.gpu else 1e-3)

    if not args.gpu:
        args.threads = args.threads or len(os.sched_getaffinity(0))
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by torch at import and by the engine
    import torch

    if args.gpu and not torch.cuda.is_available():
        print("--gpu needs a CUDA device; none is visible", file=sys.stderr)
        return 2
    device = "cuda" if args.gpu else "cpu"
    root = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    os.environ.setdefault("TUNING_MAGICS_HOME", str(root / "home"))
    try:
        model_dir = root / "model"
        n_params = build_model(model_dir, gpu=args.gpu, hidden=args.hidden, layers=args.layers)
        examples = make_data(args.examples, 0, args.max_len)
        train_path = root / "train.jsonl"
        train_path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
        print(f"model: Qwen3 {n_params / 1e6:.1f}M params on {device}{' (bf16 autocast)' if args.gpu else ' (fp32)'}; "
              f"data: {len(examples)} chat examples; epochs {args.epochs}, lr {args.lr}, batch {args.batch_size}, "
              f"max_len {args.max_len}", flush=True)

        # Both run with the same CPU threads (OMP_NUM_THREADS above, which the engine follows).
        runs = [run_engine(str(model_dir), str(train_path), str(root / "engine"), args)]
        print(f"  engine done in {runs[-1]['wall_s']:.1f} s ({torch.get_num_threads()} CPU threads)", flush=True)
        runs.append(run_trl(str(model_dir), examples, str(root / "trl"), args))
        print(f"  TRL done in {runs[-1]['wall_s']:.1f} s", flush=True)
        if args.trl_defaults:
            runs.append(run_trl(str(model_dir), examples, str(root / "trl-defaults"), args, stock_best=False))
        options = list(filter(None, args.gpu_options.split(","))) if args.gpu else []
        if args.gpu and torch.cuda.device_count() > 1:
            options.append(f"gpus={torch.cuda.device_count()}")  # data parallel over every GPU
        for option in options:
            name, _, value = option.partition("=")
            extra = {name: int(value) if value else True,
                     **({"tuning_mode": "PEFT_ADAPTER"} if name == "load_in_4bit" else {})}
            try:
                runs.append(run_engine(str(model_dir), str(train_path), str(root / name), args, **extra))
                print(f"  engine {option} done in {runs[-1]['wall_s']:.1f} s", flush=True)
            except Exception as exc:  # noqa: BLE001 - one option this machine lacks must not end the benchmark
                print(f"  engine {option}: not run here ({str(exc).splitlines()[0]})", flush=True)
        for r in runs:
            r["loss"] = score(r["final_dir"], examples, args.max_len, device)

        eng, trl = runs[0], runs[1]
        speed = eng["tokens_per_s"] / trl["tokens_per_s"]
        loss_diff = abs(eng["loss"] - trl["loss"]) / trl["loss"]
        print()
        head = f"{'trainer':44s} {'tokens/s':>10s} {'padding':>8s} {'final loss':>10s} {'own last loss':>13s} {'steps':>6s} {'wall s':>7s}"
        if args.gpu:
            head += f" {'MFU':>6s}"
        print(head)
        for r in runs:
            line = (f"{r['name']:44s} {r['tokens_per_s']:10.0f} {r['padding_share']:8.1%} {r['loss']:10.4f} "
                    f"{r['reported_loss']:13.4f} {r['steps']:6d} {r['wall_s']:7.1f}")
            if args.gpu:
                line += f" {6 * n_params * r['tokens_per_s'] / args.peak_flops:6.1%}"
            print(line)
        print()
        ok_speed = speed >= SPEED_TARGET
        ok_loss = loss_diff <= LOSS_TARGET
        print(f"speed ratio engine/TRL: {speed:.2f}x (target >= {SPEED_TARGET}x)  {'PASS' if ok_speed else 'FAIL'}")
        print(f"final loss difference:  {loss_diff:.1%} (target <= {LOSS_TARGET:.0%})  {'PASS' if ok_loss else 'FAIL'}")
        print("padding share: engine {:.1%} (its length-grouped batches) vs TRL {:.1%} (group_by_length)".format(
            eng["padding_share"], trl["padding_share"]))
        if args.gpu:
            print(f"MFU = 6 * {n_params / 1e6:.0f}M params * tokens/s / {args.peak_flops:.3g} FLOP/s "
                  "(attention FLOPs not counted)")
        print("PASS" if ok_speed and ok_loss else "FAIL")
        return 0 if ok_speed and ok_loss else 1
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

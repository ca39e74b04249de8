"""The ``tuning-magics`` command (also ``python -m tuning_magics``).

    tuning-magics validate PATH [--model ID] [--method sft|distillation] [--validation VPATH] [--json]
    tuning-magics models [--json]
    tuning-magics rebuild-registry [JOB_FOLDER ...]

``validate`` exits 0 when the dataset is valid (warnings allowed), 1 when it
is invalid and 2 on a usage or environment error (unknown option or model,
unreadable path, unreachable storage, a missing optional package).
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tuning-magics", description="Datasets and tuning jobs for open models and Gemini.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    v = sub.add_parser("validate", help="check a JSONL dataset (local path or gs:// URI)")
    v.add_argument("path", help="the JSONL file or gs:// URI")
    v.add_argument("--model", help="target model id (adds its sequence length, modality and tokenizer)")
    v.add_argument("--method", default="sft", choices=["sft", "distillation", "preference"])
    v.add_argument("--validation", metavar="VPATH", help="also check this validation set against PATH")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    m = sub.add_parser("models", help="list the tunable models")
    m.add_argument("--json", action="store_true")
    r = sub.add_parser("rebuild-registry",
                       help="list again the jobs the local registry lacks from their folders (a damaged one is made anew)")
    r.add_argument("folders", nargs="*", metavar="JOB_FOLDER", help="folders of jobs run with their own output_uri")
    return parser


def _validate(args) -> int:
    from .datasets.validate import validate

    report = validate(args.path, model=args.model, method=args.method)
    reports = [report]
    if args.validation:
        reports.append(validate(args.validation, model=args.model, method=args.method, training=args.path))
    if args.json:
        out = report.to_dict()
        if args.validation:
            out["validation"] = reports[1].to_dict()
            out["ok"] = all(r.ok for r in reports)
        print(json.dumps(out, ensure_ascii=False))
    else:
        for r in reports:
            print(r.summary())
            if r.tokenizer_note:
                print(r.tokenizer_note)
    return 0 if all(r.ok for r in reports) else 1


def _models(args) -> int:
    from .catalog import table

    df = table()
    if args.json:
        print(df.to_json(orient="records"))
    else:
        print(df.to_string(index=False))
    return 0


def _rebuild(args) -> int:
    from .api import rebuild_registry

    print(rebuild_registry(*args.folders))
    return 0


def main(argv=None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return {"validate": _validate, "models": _models, "rebuild-registry": _rebuild}[args.command](args)
    except UserError as exc:
        print(f"tuning-magics: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # a package of an extra that is not installed: an environment problem
        from .errors import missing_extra

        problem = missing_extra(exc)
        if problem is None:
            raise
        print(f"tuning-magics: error: {problem}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""The IPython magics: a thin layer over the plain Python API.

``%tuning_config [name=value ...]``
    Show the settings and where each value comes from, or set some
    (``project``, ``location``, ``staging_bucket``, ``backend``, ``api_endpoint``).
    ``%config TuningMagics.project = "my-project"`` works too.
``%tune_models [--provider open|gemini|local] [--mode FULL|PEFT_ADAPTER]``
    The catalog of tunable models as a table.
``%dataset DF [options]`` and ``%%dataset [DF] [options]`` with a YAML body
    DataFrame -> validated JSONL (see ``tuning_magics.dataset``); shows the
    report and stores the Dataset in ``--as NAME`` when given.

A mistake in the input prints one line (``UsageError: ...``) and no
traceback; add ``--verbose`` to see the traceback.
"""

from __future__ import annotations

import argparse
import keyword
import shlex

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from traitlets import Unicode, observe

from .errors import UserError
from .config import settings


class _ArgParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"%{self.prog}: {message}")

    def exit(self, status=0, message=None):
        if message:
            raise UsageError(message.strip())
        raise _HelpShown()


class _HelpShown(Exception):
    pass


def _dataset_parser() -> _ArgParser:
    p = _ArgParser(prog="dataset", add_help=True, description="DataFrame -> validated JSONL")
    p.add_argument("df", nargs="?", help="the DataFrame variable (or an expression)")
    p.add_argument("--out", "-o", help="local path or gs:// URI of the JSONL to write")
    p.add_argument("--as", dest="as_", metavar="NAME", help="store the Dataset in this variable")
    p.add_argument("--format", "-f", help="chat, prompt_completion or generate_content")
    for name in ("prompt", "completion", "user", "assistant", "system", "messages"):
        p.add_argument(f"--{name}", help=f"the {name} column")
    p.add_argument("--images", "--image", nargs="+", help="image column(s)")
    p.add_argument("--system-prompt", help="one system prompt for every example")
    p.add_argument("--validation-split", "--split", type=_number, help="fraction (or count >= 1) held out")
    p.add_argument("--validation-out", help="where the validation set goes")
    p.add_argument("--seed", type=int)
    p.add_argument("--model", "-m", help="target model (its rules and tokenizer)")
    p.add_argument("--method", help="sft (default) or distillation")
    p.add_argument("--epochs", type=int, help="for the billed-token and cost estimate")
    # store_const leaves unset flags as None, so a cell body's value is not overridden by a default.
    p.add_argument("--overwrite", action="store_const", const=True, help="replace an existing file or object")
    p.add_argument("--skip-invalid", action="store_const", const=True, help="leave invalid rows out")
    p.add_argument("--verbose", action="store_const", const=True, help="show tracebacks")
    return p


def _words(line: str, prog: str) -> list[str]:
    """The words of a magic's line, shell-style; an unclosed quote is a one-line UsageError."""
    try:
        return shlex.split(line)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise UsageError(f"%{prog}: {str(exc).lower()} in {line.strip()!r}; close the quote or escape it") from None


def _number(text: str) -> int | float:
    """A count (``20``) or a fraction (``0.1``) from the command line; the API checks the range."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _first(options: dict, *names: str):
    """Remove every one of ``names`` from ``options``; the value of the first that was given."""
    values = [options.pop(name, None) for name in names]
    return next((v for v in values if v is not None), None)


def _variable_name(value, option: str) -> str:
    if not isinstance(value, str) or not value.isidentifier() or keyword.iskeyword(value):
        raise UsageError(f"{option} needs a Python variable name such as ds, not {value!r}")
    return value


def _parse_body(cell: str) -> dict:
    """The YAML body of a cell magic as a dict of options (dashes become underscores)."""
    import yaml

    if not cell.strip():
        return {}
    try:
        body = yaml.safe_load(cell)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"the cell body is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(body, dict):
        raise UsageError("the cell body must be YAML mapping option names to values, e.g. `prompt: question`")
    return {str(k).replace("-", "_"): v for k, v in body.items()}


@magics_class
class TuningMagics(Magics):
    """Magics for datasets and tuning jobs. Settings mirror ``tuning_magics.settings``."""

    project = Unicode(None, allow_none=True, help="Google Cloud project").tag(config=True)
    location = Unicode(None, allow_none=True, help="Google Cloud region, e.g. us-central1").tag(config=True)
    staging_bucket = Unicode(None, allow_none=True, help="gs:// folder for datasets and outputs").tag(config=True)
    backend = Unicode(None, allow_none=True, help="local, vertex or auto").tag(config=True)
    api_endpoint = Unicode(None, allow_none=True, help="override of the Vertex AI API endpoint").tag(config=True)

    @observe("project", "location", "staging_bucket", "backend", "api_endpoint")
    def _setting_changed(self, change):
        try:
            settings.update(**{change["name"]: change["new"]})
        except UserError as exc:
            raise UsageError(str(exc)) from None

    # -- helpers ----------------------------------------------------------------------

    def _run(self, fn, verbose: bool = False):
        try:
            return fn()
        except UserError as exc:
            if verbose:
                raise
            report = getattr(exc, "report", None)
            if report is not None:
                self._show(report)
            raise UsageError(str(exc)) from None

    def _show(self, obj) -> None:
        from IPython.display import display

        display(obj)

    def _eval(self, expr: str):
        try:
            return self.shell.ev(expr)
        except NameError as exc:
            raise UsageError(f"{exc}; run the cell that defines it first") from None
        except SyntaxError as exc:
            raise UsageError(f"{expr!r} is not a Python expression: {exc.msg}") from None

    # -- magics ---------------------------------------------------------------------

    @line_magic
    def tuning_config(self, line: str = ""):
        """Show the settings, or set them: ``%tuning_config project=my-proj location=us-central1``."""
        values = {}
        for token in _words(line, "tuning_config"):
            token = token.lstrip("-")
            if "=" not in token:
                raise UsageError(f"%tuning_config takes name=value pairs, e.g. project=my-project (got {token!r})")
            name, value = token.split("=", 1)
            values[name.replace("-", "_")] = value
        if values:
            self._run(lambda: settings.update(**values))
        print(self._run(settings.describe))

    @line_magic
    def tune_models(self, line: str = ""):
        """The tunable models: ``%tune_models [--provider open|gemini|local] [--mode FULL|PEFT_ADAPTER]``."""
        p = _ArgParser(prog="tune_models")
        p.add_argument("--provider")
        p.add_argument("--mode")
        try:
            args = p.parse_args(_words(line, "tune_models"))
        except _HelpShown:
            return None
        from . import catalog

        df = catalog.table()
        if args.provider:
            if args.provider not in set(df["provider"]):
                raise UsageError(f"--provider must be one of {', '.join(sorted(set(df['provider'])))}, "
                                 f"not {args.provider!r}")
            df = df[df["provider"] == args.provider]
        if args.mode:
            try:
                mode = catalog.normalise_mode(args.mode)
            except UserError:
                raise UsageError(f"--mode must be FULL or PEFT_ADAPTER (LoRA), not {args.mode!r}") from None
            df = df[df["modes"].str.contains(mode)]
        return df.reset_index(drop=True)

    @line_cell_magic
    def dataset(self, line: str = "", cell: str | None = None):
        """DataFrame -> validated JSONL. ``%dataset df --prompt q --completion a --out train.jsonl --as ds``."""
        try:
            args = _dataset_parser().parse_args(_words(line, "dataset"))
        except _HelpShown:
            return None
        options = {k: v for k, v in vars(args).items() if v is not None}
        body = _parse_body(cell) if cell is not None else {}
        merged = {**body, **options}  # the cell body gives options; the line overrides them
        verbose = merged.pop("verbose", False)
        if not isinstance(verbose, bool):
            raise UsageError(f"verbose must be true or false, not {verbose!r}")
        # The line's --as and DataFrame win over the body's as: and source: (all spellings are consumed).
        as_ = _first(merged, "as_", "as")
        if as_ is not None:
            as_ = _variable_name(as_, "--as")
        source = _first(merged, "df", "source", "dataframe")
        if source is None:
            raise UsageError("%dataset needs a DataFrame: %dataset df --prompt question --completion answer")
        df = self._eval(source) if isinstance(source, str) else source
        split = merged.get("validation_split")
        if isinstance(split, float) and split.is_integer() and split >= 1:
            merged["validation_split"] = int(split)  # YAML's 20.0 is a row count, like 20
        known = {a.dest for a in _dataset_parser()._actions} - {"help", "df", "as_", "verbose"}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise UsageError(f"%dataset: unknown option {unknown[0]!r}; see %dataset --help")

        from .datasets.build import dataset

        ds = self._run(lambda: dataset(df, **merged), verbose)
        if as_:
            self.shell.push({as_: ds})
        self._show(ds)
        return None


def register(ipython) -> None:
    """Register the magics with an IPython shell."""
    ipython.register_magics(TuningMagics)

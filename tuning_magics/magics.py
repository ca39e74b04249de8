"""The IPython magics: a thin layer over the plain Python API (``tuning_magics.tune`` and friends).

Load them with ``%load_ext tuning_magics``. Every magic takes ``--help``.

Settings
--------
``%tuning_config [name=value ...]``
    Show the settings and where each value comes from, or set some
    (``project``, ``location``, ``staging_bucket``, ``backend``, ``api_endpoint``, ``mlflow``).
    ``%config TuningMagics.project = "my-project"`` sets the same store: whichever
    of the two was used last wins. ``name=`` (empty) forgets a session value.
``%tune_models [--provider open|gemini|local] [--mode FULL|PEFT_ADAPTER]``
    The catalog of tunable models as a table.

Datasets
--------
``%dataset DF [options]`` and ``%%dataset [DF] [options]`` with a YAML body
    DataFrame -> validated JSONL (see ``tuning_magics.dataset``); shows the
    report and stores the Dataset in ``--as NAME`` when given. Options:
    ``--prompt/--completion`` or ``--user/--assistant/--system`` or ``--messages``
    columns, ``--out``, ``--format``, ``--images``, ``--system-prompt``,
    ``--validation-split``, ``--validation-out``, ``--seed``, ``--model``,
    ``--method``, ``--epochs``, ``--overwrite``, ``--skip-invalid``.

Tuning
------
``%%tune [VAR] [--backend NAME] [--wait] [--dry-run] [--verbose]``
    The cell body is YAML whose keys are the parameters of ``tune()``
    (``base_model``, ``train_dataset``, ``validation_dataset``, ``tuning_mode``,
    ``method``, ``epochs``, ``learning_rate``, ``learning_rate_multiplier``,
    ``adapter_size``, ``base_teacher_model``, ``custom_base_model``,
    ``output_uri``, ``tuned_model_display_name``, ``description``, ``labels``, ...)
    and the engine's options (``batch_size``, ``max_seq_len``, ``seed``, ...).
    Short spellings work too: ``model``, ``data``, ``validation``, ``mode``,
    ``teacher``, ``display_name``. A value ``$name`` is the notebook variable
    ``name`` (a Dataset, a DataFrame, a list of records, a string, a number),
    anywhere in the values, inside lists and mappings too; ``$name.attr`` reads
    an attribute; inside a longer text ``$name`` is replaced by the variable's
    text (``display_name: lr-$lr``); ``$$`` is a literal ``$``::

        %%tune job --wait
        model: local/tiny-qwen3
        data: $ds
        epochs: 3
        learning_rate: 2e-4

    The job goes into ``VAR`` (default ``job``) and is shown below the cell (its
    live monitor). ``--wait`` then waits for it to end (Ctrl-C stops waiting,
    not the job). ``--dry-run`` checks everything and shows what would be
    submitted, with billed tokens and cost, without uploading or submitting
    (stored in ``VAR`` only when one is named). Every mistake is one line
    naming the key, before anything is submitted.
``%tune --model MODEL --data $ds [--epochs 3] [--mode FULL] [--method sft] [--backend local] [--as VAR] [--wait] [--dry-run]``
    The same in one line: every ``--key value`` is a ``tune()`` parameter or an
    engine option (``--learning-rate 1e-4``, ``--batch-size 2``, ``--key=value``).

Jobs and experiments
--------------------
``%tune_jobs [--backend NAME] [--state STATE[,STATE]] [--model TEXT] [--limit N]``
    A table of jobs, newest first: state, model, method, created, duration
    and best validation loss. Where widgets render, click a job to show it.
    The returned table has ``.jobs`` and ``.frame`` (a DataFrame).
``%tune_attach NAME [--as VAR] [--backend NAME]``
    The job with this id, Vertex AI resource name or unique display name, in
    ``VAR`` (default ``job``), shown with its monitor: after a kernel restart,
    the way back to a running job.
``%tune_compare NAME NAME ...`` (or ``$jobs``, a list of jobs or ids)
    ``tuning_magics.compare``: the loss curves of the jobs on one plot and
    their configurations side by side, the rows that differ first.
``%tune_chat [JOB] [--checkpoint C]``
    The chat panel of a job (``job.chat_panel()``): ``JOB`` is a variable
    holding a job, ``$var``, or a job id; by default the variable ``job``, else
    the job submitted or attached last, else the newest job.
``%tune_eval [JOB] [--data $df|PATH|train] [--metrics M,M] [--checkpoints all|final|C,C] [--judge URL|$var] ...``
    ``job.evaluate()``: the base model, the checkpoints and the tuned model
    scored on the same examples, with intervals, the paired test and the
    examples that flipped; the same job default as ``%tune_chat``.
``%tune_arena [JOB] --prompts $list [--against base|checkpoint-N|$job] [--as VAR]``
    ``job.arena()``: two models answer side by side, anonymous and in random
    order, and you vote; the votes rank them and become preference pairs.
``%tune_export [JOB] [hf|peft|gguf|ollama] [--quantization Q] [--path P] [--checkpoint C] ...``
    ``job.export()``: the tuned model written for another runtime (transformers,
    vLLM, llama.cpp, Ollama), loaded by it on its own and asked the job's
    prompts; kept only when it answers as the job does.

Errors
------
A mistake in the input (options, YAML, a variable, a value) prints one line
(``UsageError: ...``) and no traceback; add ``--verbose`` to see the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import keyword
import re
import shlex

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class, no_var_expand
from traitlets import TraitError, Unicode, observe, validate

from .errors import UserError
from .config import settings

#: The settings that are also traitlets of TuningMagics (``%config TuningMagics.<name> = ...``).
_SETTINGS = ("project", "location", "staging_bucket", "backend", "api_endpoint", "mlflow")

#: Short spellings of tune() parameters for %tune and %%tune.
_SHORT = {
    "model": "base_model",
    "data": "train_dataset",
    "validation": "validation_dataset",
    "mode": "tuning_mode",
    "teacher": "base_teacher_model",
    "display_name": "tuned_model_display_name",
}
#: Flags of %tune / %%tune that are not tune() parameters.
_FLAGS = ("wait", "dry_run", "verbose")


class _ArgParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"%{self.prog}: {message}")

    def exit(self, status=0, message=None):
        if message:
            raise UsageError(message.strip())
        raise _HelpShown()


class _HelpShown(Exception):
    pass


def _parse(parser: _ArgParser, line: str):
    """The parsed line, or None when ``--help`` was shown; an option given twice is a one-line UsageError."""
    words = _words(line, parser.prog)
    for action in parser._actions:
        spellings = [o for o in action.option_strings if o.startswith("--")]
        given = [w for w in words for o in spellings if w == o or w.startswith(o + "=")]
        if len(given) > 1 and action.dest != "help":
            raise UsageError(f"%{parser.prog}: {spellings[0]} is given twice; give it once")
    try:
        return parser.parse_args(words)
    except _HelpShown:
        return None


def _dataset_parser() -> _ArgParser:
    p = _ArgParser(prog="dataset", add_help=True, description="DataFrame -> validated JSONL")
    p.add_argument("df", nargs="?", help="the DataFrame variable (or an expression)")
    p.add_argument("--out", "-o", help="local path or gs:// URI of the JSONL to write")
    p.add_argument("--as", dest="as_", metavar="NAME", help="store the Dataset in this variable")
    p.add_argument("--format", "-f", help="chat, prompt_completion or generate_content")
    for name in ("prompt", "completion", "user", "assistant", "system", "messages"):
        p.add_argument(f"--{name}", help=f"the {name} column")
    for name in ("chosen", "rejected"):
        p.add_argument(f"--{name}", help=f"the {name} answer's column (with --method preference)")
    p.add_argument("--images", "--image", nargs="+", help="image column(s)")
    p.add_argument("--system-prompt", help="one system prompt for every example")
    p.add_argument("--validation-split", "--split", type=_number, help="fraction (or count >= 1) held out")
    p.add_argument("--validation-out", help="where the validation set goes")
    p.add_argument("--seed", type=int)
    p.add_argument("--model", "-m", help="target model (its rules and tokenizer)")
    p.add_argument("--method", help="sft (default), distillation or preference")
    p.add_argument("--epochs", type=int, help="for the billed-token and cost estimate")
    # store_const leaves unset flags as None, so a cell body's value is not overridden by a default.
    p.add_argument("--overwrite", action="store_const", const=True, help="replace an existing file or object")
    p.add_argument("--skip-invalid", action="store_const", const=True, help="leave invalid rows out")
    p.add_argument("--verbose", action="store_const", const=True, help="show tracebacks")
    return p


def _tune_cell_parser() -> _ArgParser:
    p = _ArgParser(prog="%tune", description="Submit a tuning job; the cell body is YAML of tune() parameters.",
                   epilog="The line form: %tune --model local/tiny-qwen3 --data $ds --epochs 3 [--as job]")
    p.add_argument("var", nargs="?", help="the variable the Job goes into (default: job)")
    p.add_argument("--as", dest="as_", metavar="VAR", help="the same as VAR")
    p.add_argument("--backend", help="local, vertex or another registered backend (default: from the model "
                                     "and the settings)")
    p.add_argument("--wait", action="store_const", const=True, help="wait for the job to end")
    p.add_argument("--dry-run", action="store_const", const=True,
                   help="check everything and show what would be submitted, without submitting")
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


def _scalar(text: str):
    """A value from a magic's line: a number, true/false/null, a YAML ``[list]`` or ``{mapping}``, else the text."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    try:
        return _number(text)
    except argparse.ArgumentTypeError:
        pass
    if text.strip()[:1] in ("[", "{"):
        return _load_yaml(text, "the value " + repr(text))
    return text


def _first(options: dict, *names: str):
    """Remove every one of ``names`` from ``options``; the value of the first that was given."""
    values = [options.pop(name, None) for name in names]
    return next((v for v in values if v is not None), None)


def _variable_name(value, option: str) -> str:
    if not isinstance(value, str) or not value.isidentifier() or keyword.iskeyword(value):
        raise UsageError(f"{option} needs a Python variable name such as ds, not {value!r}")
    return value


# -- YAML cell bodies ----------------------------------------------------------------------

_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


def _yaml_loader():
    """A safe YAML loader that reads ``1e-4`` as a number and refuses a key given twice."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            # An alias is expanded before any key is checked: nine nested ones make gigabytes of a few
            # hundred bytes. A cell body has $variables for reuse, so aliases are refused as they are met.
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise _AliasRefused(event.anchor, event.start_mark.line + 1)
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hashed = hash(key)
                except TypeError:
                    continue  # the base class reports an unhashable key
                if hashed is not None and key in seen:
                    raise _DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    # YAML 1.1 reads 1e-4 (no dot) as text; a learning rate is written that way more often than not.
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789"))
    return Loader


class _AliasRefused(Exception):
    def __init__(self, anchor: str, line: int):
        super().__init__(anchor)
        self.anchor, self.line = anchor, line


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, again: int):
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


def _load_yaml(text: str, what: str):
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except _AliasRefused as alias:
        raise UsageError(f"{what}: the YAML alias *{alias.anchor} (line {alias.line}) is not taken; write the value "
                         "out, or give it as a $variable") from None
    except _DuplicateKey as dup:
        raise UsageError(f"{what}: key {dup.key!r} is given twice (lines {dup.first} and {dup.again}); "
                         "keep one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{what} is not valid YAML{where}: {problem}") from None


def _parse_body(cell: str, what: str = "the cell body") -> dict:
    """The YAML body of a cell magic as a dict of options (dashes become underscores)."""
    if not cell.strip():
        return {}
    body = _load_yaml(cell, what)
    if body is None:  # only comments
        return {}
    if not isinstance(body, dict):
        raise UsageError(f"{what} must be YAML mapping option names to values, e.g. `epochs: 3`")
    return {str(k).replace("-", "_"): v for k, v in body.items()}


# -- $variables ---------------------------------------------------------------------------

_WHOLE_VAR = re.compile(r"\$([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
_ANY_VAR = re.compile(r"\$\$|\$([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
_MISSING = object()


def _lookup(ns: dict, dotted: str, where: str):
    """The value of ``$name`` or ``$name.attr`` in the notebook; a one-line UsageError naming ``where``."""
    name, *attrs = dotted.split(".")
    value = ns.get(name, _MISSING)
    if value is _MISSING:
        raise UsageError(f"{where}: ${name} is not a notebook variable; run the cell that defines {name} first")
    for attr in attrs:
        try:
            value = getattr(value, attr)
        except AttributeError:
            raise UsageError(f"{where}: ${dotted}: {type(value).__name__} has no attribute {attr!r}") from None
        except Exception as exc:  # a property that raises: its own words, in one line
            said = " ".join(str(exc).split()) or type(exc).__name__
            raise UsageError(f"{where}: reading ${dotted} failed: {type(exc).__name__}: {said}"[:500]) from None
    if value is None:
        # A parameter given as a variable is meant to be given: None would silently drop it (a job still
        # running has no tuned_model yet, and the base model would be tuned instead).
        raise UsageError(f"{where}: ${dotted} is None; a $variable must hold a value (is the job it comes from "
                         "finished? job.wait() first), or leave the key out")
    return value


def _resolve(value, path: str, ns: dict, prog: str):
    """``value`` (of the key ``path``) with every ``$name`` replaced by the notebook variable, in lists and
    mappings too."""
    where = f"{prog}: key {path!r}"
    if isinstance(value, str):
        whole = _WHOLE_VAR.fullmatch(value)
        if whole:
            return _lookup(ns, whole.group(1), where)
        if "$" not in value:
            return value

        def text(match):
            if match.group(0) == "$$":
                return "$"
            found = _lookup(ns, match.group(1), where)
            if isinstance(found, bool) or not isinstance(found, (str, int, float)):
                raise UsageError(f"{where}: ${match.group(1)} is a {type(found).__name__}; only text and numbers "
                                 "can go inside a longer text (give it as the whole value)")
            return str(found)

        return _ANY_VAR.sub(text, value)
    if isinstance(value, list):
        return [_resolve(v, f"{path}[{i}]", ns, prog) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _resolve(v, f"{path}.{k}", ns, prog) for k, v in value.items()}
    return value


# -- tune() keys ---------------------------------------------------------------------------


def _tune_parameters() -> list[str]:
    """The named parameters of ``tune()`` (engine options are the other keys)."""
    import inspect

    from .api import tune

    return [p.name for p in inspect.signature(tune).parameters.values() if p.kind != p.VAR_KEYWORD]


def _tune_aliases() -> dict:
    """Every other spelling of a tune() parameter -> the parameter."""
    from .api import _ALIASES

    return {**_SHORT, **_ALIASES}


def _canonical(options: dict, prog: str) -> dict:
    """``options`` with short spellings and aliases turned into tune()'s own names; a key given twice is an error."""
    aliases = _tune_aliases()
    out, given_as = {}, {}
    for key, value in options.items():
        name = aliases.get(key, key)
        if name in out:
            raise UsageError(f"{prog}: {given_as[name]!r} and {key!r} are the same parameter ({name}); give one")
        out[name], given_as[name] = value, key
    return out


def _is_engine_option(key: str) -> bool:
    from . import backends

    return key in backends.engine_options()


def _unknown_key_error(key: str, prog: str) -> UsageError:
    """One line for a key that is neither a tune() parameter nor any backend's engine option, naming the keys."""
    from . import backends

    params = [p for p in _tune_parameters() if p not in ("backend", "dry_run", "wait")]
    options = sorted(backends.engine_options())
    close = difflib.get_close_matches(key, params + options + list(_SHORT), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UsageError(f"{prog}: unknown key {key!r}{hint}; keys are the tune() parameters ({', '.join(params)}) "
                      f"and the engine options ({', '.join(options)})")


@magics_class
class TuningMagics(Magics):
    """Magics for datasets and tuning jobs. Settings mirror ``tuning_magics.settings``."""

    project = Unicode(None, allow_none=True, help="Google Cloud project").tag(config=True)
    location = Unicode(None, allow_none=True, help="Google Cloud region, e.g. us-central1").tag(config=True)
    staging_bucket = Unicode(None, allow_none=True, help="gs:// folder for datasets and outputs").tag(config=True)
    backend = Unicode(None, allow_none=True, help="local, vertex or auto").tag(config=True)
    api_endpoint = Unicode(None, allow_none=True, help="override of the Vertex AI API endpoint").tag(config=True)
    mlflow = Unicode(None, allow_none=True, help="true: log every job to MLflow when it ends").tag(config=True)

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self._last_job = None

    @validate(*_SETTINGS)
    def _setting_valid(self, proposal):
        # A value the settings refuse never becomes the trait's value: %config shows what is in effect.
        from .config import check

        name, value = proposal["trait"].name, proposal["value"]
        if value is not None and str(value).strip():
            try:
                check(name, value)
            except UserError as exc:
                raise TraitError(str(exc)) from None
        return value

    @observe(*_SETTINGS)
    def _setting_changed(self, change):
        # Configuration at start-up (ipython_config.py) arrives here.
        try:
            settings.update(**{change["name"]: change["new"]})
        except UserError as exc:
            raise UsageError(str(exc)) from None

    def update_config(self, config):
        """``%config TuningMagics.x = v`` sets the setting even when the trait already holds ``v``.

        The settings object is the one store: ``%tuning_config`` or
        ``settings.update`` may have changed it since, and the last one set wins.
        """
        super().update_config(config)
        section = config[type(self).__name__] if type(self).__name__ in config else {}
        values = {name: section[name] for name in _SETTINGS if name in section}
        if values:
            try:
                settings.update(**values)
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
            message = str(exc)
            if report is not None:
                self._show(report)
                message = getattr(exc, "beside_report", message)  # the report lists the errors: not twice
            raise UsageError(" ".join(message.split("\n"))) from None

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

    def _keep(self, var: str | None, obj) -> None:
        if var:
            self.shell.push({var: obj})

    # -- settings and catalog -----------------------------------------------------------

    @line_magic
    def tuning_config(self, line: str = ""):
        """Show the settings, or set them: ``%tuning_config project=my-proj location=us-central1``."""
        values = {}
        for token in _words(line, "tuning_config"):
            if token in ("-h", "--help"):
                print("%tuning_config [name=value ...]: show the settings, or set them; names: "
                      f"{', '.join(_SETTINGS)}; name= forgets a session value")
                return None
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
        args = _parse(p, line)
        if args is None:
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

    # -- datasets -------------------------------------------------------------------------

    @line_cell_magic
    def dataset(self, line: str = "", cell: str | None = None):
        """DataFrame -> validated JSONL. ``%dataset df --prompt q --completion a --out train.jsonl --as ds``."""
        args = _parse(_dataset_parser(), line)
        if args is None:
            return None
        options = {k: v for k, v in vars(args).items() if v is not None}
        body = _parse_body(cell, "%%dataset: the cell body") if cell is not None else {}
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

    # -- tuning ---------------------------------------------------------------------------

    @line_cell_magic
    @no_var_expand
    def tune(self, line: str = "", cell: str | None = None):
        """Submit a tuning job: ``%%tune [var] [--backend B] [--wait] [--dry-run]`` with a YAML body of tune()
        parameters, or ``%tune --model local/tiny-qwen3 --data $ds --epochs 3 [--as var]``."""
        if cell is None:
            return self._tune_line(line)
        args = _parse(_tune_cell_parser(), line)
        if args is None:
            return None
        if args.var and args.as_ and args.var != args.as_:
            raise UsageError(f"%%tune: give the variable once, as VAR or --as, not {args.var!r} and {args.as_!r}")
        var = args.var or args.as_
        options = _parse_body(cell, "%%tune: the cell body")
        for flag, value in (("backend", args.backend), ("wait", args.wait), ("dry_run", args.dry_run),
                            ("verbose", args.verbose)):
            if value is not None:
                options[flag] = value  # the line wins over the body
        return self._submit(options, var, "%%tune")

    def _tune_line(self, line: str):
        words = _words(line, "tune")
        if not words:
            raise UsageError("%tune needs options: %tune --model local/tiny-qwen3 --data $ds --epochs 3, or use "
                             "%%tune with a YAML cell body (%tune --help)")
        if words[0] in ("-h", "--help"):
            _tune_cell_parser().print_help()
            return None
        options: dict = {}
        var = None
        i = 0
        while i < len(words):
            word = words[i]
            if not word.startswith("--") or len(word) == 2:
                raise UsageError(f"%tune: unexpected {word!r}; the line form takes --key value pairs, e.g. "
                                 "%tune --model local/tiny-qwen3 --data $ds (or use %%tune VAR with a YAML body)")
            key, eq, value = word[2:].partition("=")
            key = key.replace("-", "_")
            if key in _FLAGS and not eq:
                options[key] = True
                i += 1
                continue
            if not eq:
                if i + 1 >= len(words) or (words[i + 1].startswith("--") and len(words[i + 1]) > 2):
                    raise UsageError(f"%tune: --{word[2:]} needs a value")
                value = words[i + 1]
                i += 1
            i += 1
            if key == "as":
                if var is not None:
                    raise UsageError("%tune: --as is given twice; give it once")
                var = _variable_name(value, "--as")
                continue
            if key in options:
                raise UsageError(f"%tune: --{key.replace('_', '-')} is given twice; give it once")
            options[key] = value if key in ("model", "base_model") else _scalar(value)
        return self._submit(options, var, "%tune")

    def _submit(self, options: dict, var: str | None, prog: str):
        """Check the keys, resolve ``$vars``, call ``tune()``; keep and show the Job (or the dry run)."""
        verbose = options.pop("verbose", None) or False
        if not isinstance(verbose, bool):
            raise UsageError(f"{prog}: verbose must be true or false, not {verbose!r}")
        for flag in ("wait", "dry_run"):
            if not isinstance(options.get(flag, False), bool):
                raise UsageError(f"{prog}: {flag} must be true or false, not {options[flag]!r}")
        as_ = _first(options, "as", "as_")
        if as_ is not None and var is not None and as_ != var:
            raise UsageError(f"{prog}: give the variable once, on the line ({var!r}) or as as: ({as_!r})")
        var = var or as_
        if var is not None:
            var = _variable_name(var, f"{prog} VAR")
        options = _canonical(options, prog)
        known = set(_tune_parameters()) | {"wait", "dry_run"}
        for key in options:
            if key not in known and not _is_engine_option(key):
                raise _unknown_key_error(key, prog)
        if not options.get("base_model"):
            raise UsageError(f"{prog}: base_model is required (model: local/tiny-qwen3); %tune_models lists them")
        ns = self.shell.user_ns
        options = {key: _resolve(value, key, ns, prog) for key, value in options.items()}
        wait = options.pop("wait", False)
        dry_run = options.pop("dry_run", False)
        params = set(_tune_parameters())

        def submit():
            from .api import tune

            try:
                return tune(**options, dry_run=dry_run, wait=False)
            except UserError as exc:
                if exc.field in options and exc.field not in params and not _is_engine_option(exc.field):
                    raise _unknown_key_error(exc.field, prog) from None
                raise

        result = self._run(submit, verbose)
        if dry_run:
            self._keep(var, result)  # only where the user named a variable: `job` stays a job
            self._show(result)
            return None
        self._keep(var or "job", result)
        self._last_job = result
        self._show(result)
        if wait:
            self._wait(result)
        return None

    def _wait(self, job) -> None:
        try:
            job.wait()
        except KeyboardInterrupt:
            print(f"stopped waiting; job {job.id} keeps running (job.cancel() stops it)")
            return
        line = f"job {job.id}: {job.state}"
        if job.error_summary:
            line += f": {job.error_summary}"
        print(line)

    # -- jobs -----------------------------------------------------------------------------

    @line_magic
    def tune_jobs(self, line: str = ""):
        """The jobs as a table: ``%tune_jobs [--backend NAME] [--state S] [--model TEXT] [--limit N]``."""
        p = _ArgParser(prog="tune_jobs", description="Tuning jobs, newest first.")
        p.add_argument("--backend", help="one backend (default: every backend that lists jobs here)")
        p.add_argument("--state", help="only jobs in this state, e.g. SUCCEEDED or RUNNING,QUEUED")
        p.add_argument("--model", help="only jobs whose base model contains this text")
        p.add_argument("--limit", type=int, help="at most this many jobs")
        p.add_argument("--verbose", action="store_true", help="show tracebacks")
        args = _parse(p, line)
        if args is None:
            return None
        state = [s for s in args.state.split(",") if s.strip()] if args.state else None
        if args.state is not None and not state:
            raise UsageError("%tune_jobs: --state needs a state, e.g. --state SUCCEEDED")

        def find():
            import warnings

            from .api import list_jobs
            from .display.jobs_table import JobsTable
            from .experiments import jobs_frame

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                jobs = list_jobs(args.limit, backend=args.backend, state=state, model=args.model)
            for w in caught:
                print(f"note: {w.message}")
            return JobsTable(jobs, jobs_frame(jobs))

        return self._run(find, args.verbose)

    @line_magic
    @no_var_expand
    def tune_attach(self, line: str = ""):
        """Find a job again (after a kernel restart): ``%tune_attach NAME [--as VAR]``; shows its monitor."""
        p = _ArgParser(prog="tune_attach", description="A job by id, resource name or unique display name.")
        p.add_argument("name", help="job id, Vertex AI resource name or unique display name")
        p.add_argument("--as", dest="as_", metavar="VAR", default="job", help="the variable (default: job)")
        p.add_argument("--backend", help="the backend to look in (default: the one whose job names look like NAME)")
        p.add_argument("--verbose", action="store_true", help="show tracebacks")
        args = _parse(p, line)
        if args is None:
            return None
        var = _variable_name(args.as_, "--as")
        name = self._value(args.name, "%tune_attach")
        if not isinstance(name, str):  # a $var holding something else
            raise UsageError(f"%tune_attach: {args.name} must hold a job id as text, not {type(name).__name__}")
        from .api import get_job

        job = self._run(lambda: get_job(name, backend=args.backend), args.verbose)
        self._keep(var, job)
        self._last_job = job
        self._show(job)
        return None

    def _jobs_of(self, word: str, prog: str) -> list:
        """The jobs a word of a line names: ``$var`` (a job, an id or a list of them), a variable, or an id."""
        from .jobs import Job

        ns = self.shell.user_ns
        if _WHOLE_VAR.fullmatch(word):
            value = _lookup(ns, word[1:], prog)
        elif word.isidentifier() and isinstance(ns.get(word), (Job, list, tuple)):
            value = ns[word]
        else:
            value = word
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if not isinstance(item, (Job, str)):
                raise UsageError(f"{prog}: {word} holds a {type(item).__name__}; give jobs or job ids")
        return items

    @line_magic
    @no_var_expand
    def tune_compare(self, line: str = ""):
        """Loss curves and configs of several jobs side by side: ``%tune_compare NAME NAME ...`` or ``$jobs``."""
        p = _ArgParser(prog="tune_compare", description="tuning_magics.compare(jobs) for jobs by id or variable.")
        p.add_argument("jobs", nargs="+", help="job ids, variables holding jobs, or $list")
        p.add_argument("--verbose", action="store_true", help="show tracebacks")
        args = _parse(p, line)
        if args is None:
            return None
        items = [item for word in args.jobs for item in self._jobs_of(word, "%tune_compare")]
        from .experiments import compare

        return self._run(lambda: compare(items), args.verbose)

    @line_magic
    @no_var_expand
    def tune_chat(self, line: str = ""):
        """Chat with a tuned model: ``%tune_chat [JOB] [--checkpoint C]`` opens ``job.chat_panel()``."""
        p = _ArgParser(prog="tune_chat", description="The chat panel of a job.")
        p.add_argument("job", nargs="?", help="a variable holding a job, $var, or a job id (default: job)")
        p.add_argument("--checkpoint", help="a checkpoint name such as checkpoint-8 (default: final)")
        p.add_argument("--verbose", action="store_true", help="show tracebacks")
        args = _parse(p, line)
        if args is None:
            return None
        job = self._chat_job(args.job, args.verbose)
        panel = getattr(job, "chat_panel", None)
        if panel is None:
            raise UsageError(f"%tune_chat: this installation has no chat panel for {type(job).__name__} "
                             f"{job.id}; use job.chat('...') instead")
        return self._run(lambda: panel(checkpoint=args.checkpoint), args.verbose)

    @line_magic
    @no_var_expand
    def tune_eval(self, line: str = ""):
        """Did tuning help? ``%tune_eval [JOB] [--data $df] [--metrics exact_match,rouge_l] [--checkpoints final]
        [--no-baseline] [--max-new-tokens N] [--judge URL|$var] [--as VAR]``: ``job.evaluate()``, shown."""
        p = _ArgParser(prog="tune_eval", description="Score a job's base model, checkpoints and tuned model.")
        p.add_argument("job", nargs="?", help="a variable holding a job, $var, or a job id (default: job)")
        p.add_argument("--data", help="$var holding the examples, a JSONL path, or 'train' (default: the "
                                      "job's validation set)")
        p.add_argument("--metrics", default="exact_match", help="names, comma-separated (default: exact_match)")
        p.add_argument("--checkpoints", default="all", help="'all' (default), 'final', or names, comma-separated")
        p.add_argument("--no-baseline", action="store_true", help="leave out the model before tuning")
        p.add_argument("--max-new-tokens", type=int, help="the longest answer, in tokens (default: 128)")
        p.add_argument("--judge", help="a judge: the base URL of an OpenAI-compatible server, or $var holding a "
                                       "tm.Judge, a job or an endpoint")
        p.add_argument("--as", dest="as_", metavar="VAR", help="keep the Evaluation in this variable")
        p.add_argument("--verbose", action="store_true", help="show tracebacks")
        args = _parse(p, line)
        if args is None:
            return None
        job = self._chat_job(args.job, args.verbose, prog="%tune_eval")
        data, judge = self._value(args.data, "%tune_eval"), self._value(args.judge, "%tune_eval")
        checkpoints = {"all": "all", "final": None}.get(args.checkpoints,
                                                        [c.strip() for c in args.checkpoints.split(",") if c.strip()])
        var = _variable_name(args.as_, "--as") if args.as_ else None
        result = self._run(lambda: job.evaluate(data, args.metrics, checkpoints=checkpoints,
                                                baseline=not args.no_baseline, max_new_tokens=args.max_new_tokens,
                                                judge=judge), args.verbose)
        if var is not None:
            self._keep(var, result)
        return result

    @line_magic
    @no_var_expand
    def tune_export(self, line: str = ""):
        """Take the model elsewhere: ``%tune_export [JOB] [hf|peft|gguf|ollama] [--quantization f16|bf16|q8_0|f32]
        [--path P] [--checkpoint C] [--overwrite] [--no-verify] [--as VAR]``: ``job.export()``, verified against
        the job's own answers."""
        p = _ArgParser(prog="tune_export", description="Write a job's model for another runtime, and verify it.")
        p.add_argument("job", nargs="?", help="a variable holding a job, $var, or a job id (default: job)")
        p.add_argument("format", nargs="?", default="hf", help="hf (a Hugging Face folder, default), peft (a LoRA "
                                                               "job's adapter), gguf (llama.cpp) or ollama")
        p.add_argument("--quantization", default="f16", help="gguf and ollama: f16 (default), bf16, q8_0 or f32")
        p.add_argument("--path", help="where to write it (default: exports/ in the job's folder)")
        p.add_argument("--checkpoint", default="final", help="which model (default: final)")
        p.add_argument("--overwrite", action="store_true", help="replace what is at the path")
        p.add_argument("--no-verify", action="store_true", help="skip asking the exported model the job's prompts")
        p.add_argument("--as", dest="as_", metavar="VAR", help="keep the Export in this variable")
        p.add_argument("--verbose", action="store_true", help="show tracebacks")
        args = _parse(p, line)
        if args is None:
            return None
        from .export import FORMATS

        if args.job in FORMATS and args.format == "hf":  # %tune_export peft: the default job, that format
            args.job, args.format = None, args.job
        job = self._chat_job(args.job, args.verbose, prog="%tune_export")
        var = _variable_name(args.as_, "--as") if args.as_ else None
        result = self._run(lambda: job.export(args.format, args.path, checkpoint=args.checkpoint,
                                              quantization=args.quantization, verify=not args.no_verify,
                                              overwrite=args.overwrite), args.verbose)
        if var is not None:
            self._keep(var, result)
        return result

    @line_magic
    @no_var_expand
    def tune_arena(self, line: str = ""):
        """Two models side by side, anonymous, and you vote: ``%tune_arena [JOB] --prompts $list
        [--against base|checkpoint-N|$job] [--checkpoint final] [--name NAME] [--as VAR]``: ``job.arena()``."""
        p = _ArgParser(prog="tune_arena", description="Vote between two models' answers, shown as A and B.")
        p.add_argument("job", nargs="?", help="a variable holding a job, $var, or a job id (default: job)")
        p.add_argument("--prompts", required=True, help="$var holding the prompts (texts or chat conversations)")
        p.add_argument("--against", default="base", help="'base' (default), a checkpoint's name, or $var holding "
                                                         "another job or a model with chat()")
        p.add_argument("--checkpoint", default="final", help="this job's side (default: final)")
        p.add_argument("--name", help="the arena's name: its votes file (default: made from the models and prompts)")
        p.add_argument("--as", dest="as_", metavar="VAR", help="keep the Arena in this variable")
        p.add_argument("--verbose", action="store_true", help="show tracebacks")
        args = _parse(p, line)
        if args is None:
            return None
        job = self._chat_job(args.job, args.verbose, prog="%tune_arena")
        if not _WHOLE_VAR.fullmatch(args.prompts):
            raise UsageError("%tune_arena: --prompts takes a $variable holding a list of prompts")
        prompts, against = self._value(args.prompts, "%tune_arena"), self._value(args.against, "%tune_arena")
        var = _variable_name(args.as_, "--as") if args.as_ else None
        arena = self._run(lambda: job.arena(prompts, against=against, checkpoint=args.checkpoint, name=args.name),
                          args.verbose)
        if var is not None:
            self._keep(var, arena)
        return arena

    def _value(self, word: str | None, prog: str):
        """A word of a line as its value: the notebook variable a whole ``$var`` names, else the word itself."""
        if word is not None and _WHOLE_VAR.fullmatch(word):
            return _lookup(self.shell.user_ns, word[1:], prog)
        return word

    def _chat_job(self, word: str | None, verbose: bool, prog: str = "%tune_chat"):
        from .jobs import Job

        if word is not None:
            items = self._jobs_of(word, prog)
            if len(items) != 1:
                raise UsageError(f"{prog}: {word} holds {len(items)} jobs; name one")
            item = items[0]
            if isinstance(item, Job):
                return item
            from .api import get_job

            return self._run(lambda: get_job(item), verbose)
        if isinstance(self.shell.user_ns.get("job"), Job):
            return self.shell.user_ns["job"]
        if self._last_job is not None:
            return self._last_job
        from .api import list_jobs

        newest = self._run(lambda: list_jobs(1), verbose)
        if not newest:
            raise UsageError(f"{prog}: there is no job yet; submit one with %%tune, or name one: {prog} JOB")
        return newest[0]


def register(ipython) -> None:
    """Register the magics with an IPython shell."""
    ipython.register_magics(TuningMagics)


def load_ipython_extension(ipython) -> None:
    """Register the magics: ``%load_ext tuning_magics``."""
    register(ipython)

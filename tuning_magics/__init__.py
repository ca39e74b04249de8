"""tuning_magics: from a pandas DataFrame to a fine-tuned model and a chat with it, in a notebook.

In a notebook::

    %load_ext tuning_magics
    %dataset df --prompt question --completion answer --out train.jsonl --model local/tiny-qwen3

In plain Python::

    import tuning_magics as tm
    ds = tm.dataset(df, out="train.jsonl", prompt="question", completion="answer")
    report = tm.validate("train.jsonl", model="qwen/qwen3@qwen3-4b")

Heavy packages (torch, transformers, the Google Cloud SDKs) are imported only
when the feature that needs them is used, so loading the extension is cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

# name -> (module, attribute); resolved on first use so `import tuning_magics` stays light.
_LAZY = {
    "settings": ("tuning_magics.config", "settings"),
    "UserError": ("tuning_magics.errors", "UserError"),
    "catalog": ("tuning_magics.catalog", None),
    "dataset": ("tuning_magics.datasets.build", "dataset"),
    "Dataset": ("tuning_magics.datasets.build", "Dataset"),
    "validate": ("tuning_magics.datasets.validate", "validate"),
    "ValidationReport": ("tuning_magics.datasets.validate", "ValidationReport"),
    "tune": ("tuning_magics.api", "tune"),
    "get_job": ("tuning_magics.api", "get_job"),
    "list_jobs": ("tuning_magics.api", "list_jobs"),
    "rebuild_registry": ("tuning_magics.api", "rebuild_registry"),
    "log_to_mlflow": ("tuning_magics.tracking", "log_to_mlflow"),
    "compare": ("tuning_magics.experiments", "compare"),
    "check_setup": ("tuning_magics.backends.vertex.setup", "check_setup"),
    "Comparison": ("tuning_magics.experiments", "Comparison"),
    "evaluate": ("tuning_magics.evaluation", "evaluate"),
    "Evaluation": ("tuning_magics.evaluation", "Evaluation"),
    "metrics": ("tuning_magics.evaluation.metrics", None),
    "Judge": ("tuning_magics.evaluation.judge", "Judge"),
    "Arena": ("tuning_magics.arena", "Arena"),
    # %load_ext tuning_magics: IPython reads this attribute, so the magics load only then.
    "load_ipython_extension": ("tuning_magics.magics", "load_ipython_extension"),
}

__all__ = sorted(_LAZY) + ["unload_ipython_extension"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'tuning_magics' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def unload_ipython_extension(ipython) -> None:
    """Nothing to undo beyond what IPython does itself."""

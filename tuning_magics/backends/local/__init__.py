"""The embedded local engine: really fine-tunes models on this machine.

Modules (import them directly; none is imported here so that
``import tuning_magics`` stays fast):

- ``models``: the built-in ``local/tiny-*`` models (their tokenizer is in
  ``tuning_magics.datasets.tokenizer``) and loading of catalog ids,
  Hugging Face repo ids (offline, from the HF cache) and local folders.
- ``data``: chat template application, completion-only labels, length-grouped batches.
- ``checkpoints``: atomic checkpoint folders in the managed service's layout.
- ``trainer``: ``TrainConfig``, ``train()`` and ``TrainResult``.
- ``memory``: memory estimates and the check that a job fits this machine.
- ``generate``: ``LocalChatModel`` for chatting with any checkpoint.
"""

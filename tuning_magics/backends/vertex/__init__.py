"""Vertex AI's managed tuning, through google-genai and google-cloud-aiplatform.

Modules (import them directly; none is imported here, and each imports the
cloud SDKs only when called, so ``import tuning_magics`` stays fast):

- ``client``: project, location, credentials and endpoint from the settings;
  the SDK clients; every API or network error as one line, without tokens.
- ``submit``: Vertex AI's own checks, dataset uploads named by content, the
  ``tunings.tune`` call, and ``dry_run`` (the exact request body, billed tokens, cost).
- ``jobs``: ``VertexJob``: states and sub-states, data stats, checkpoints, cancel.
- ``metrics``: loss and accuracy per step from the job's experiment.
- ``images``: inline images of a dataset staged as Cloud Storage objects.
- ``endpoints``: Model Garden deploy of tuned open models, chat with an
  endpoint (``predict``, chat completions or ``generate_content``), and
  batch prediction with a tuned Gemini model.
"""

"""What users see: HTML and widget views of datasets and jobs, each with a plain-text fallback.

Views read plain objects (reports, Datasets, Jobs) and never call a backend.
"""

"""Backends that run tuning jobs: the embedded local engine and Vertex AI.

Nothing heavy is imported here; each backend imports its SDKs (torch,
transformers, google-genai, ...) only when it is used.
"""

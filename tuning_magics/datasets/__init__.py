"""Datasets: the JSONL formats, DataFrame conversion, validation and token statistics."""

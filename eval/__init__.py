"""Comparison runs, metrics and reports (installed as ``vlhooks.eval``).

Owns ``vlhooks compare``: the same prompts, references and seeds across arms (no reference, embedding blend,
zero-shot injection, trained adapters), image grids, metrics and an HTML report.
"""

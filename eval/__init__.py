"""Comparison runs, metrics and reports (installed as ``vlhooks.eval``).

Owns ``vlhooks compare``: the same prompts, references and seeds across arms (no reference, embedding blend,
zero-shot injection, trained adapters), image grids, metrics and an HTML report. One job per module:
``config`` (defaults, loading, checking), ``arms`` (the arms, the random control), ``toy_world`` /
``pipeline_world`` (generation), ``metrics``, ``report`` (grid, HTML, JSON / CSV, wandb), ``compare`` (the run
loop and the command); ``toy`` is the toy DiT's own class-accuracy check.
"""

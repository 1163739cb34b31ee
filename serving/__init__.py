"""Real-time recommendation service: a BentoML service around a Starlette API (`service.py`, `app.py`).

The ranking path (`ranking`, `candidates`, `filters`) is plain Python; `runtime` holds the process state;
`server.serve` runs it locally. Nothing here imports Dagster, Great Expectations or Evidently: the Bento must not
need them.
"""

"""`gaussdiff serve`: a local web playground for the models named at start.

- playground.py: the engine apart from HTTP (models, request checks, limits, one job at a time,
  step-by-step x̂_0 previews, results kept in memory)
- app.py: the Starlette application (the `serve` extra: starlette, uvicorn)
- page.py: the page
"""

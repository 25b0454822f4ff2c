"""The OpenAI-compatible HTTP server (FastAPI + uvicorn); only `moelora serve` imports it."""

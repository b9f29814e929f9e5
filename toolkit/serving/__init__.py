"""``toolkit serve``: an OpenAI-compatible HTTP server over the runtime, for validating and measuring an export
under concurrent traffic on one machine (serving at scale stays with vLLM and llama.cpp, which load our exports).

    config.py    the settings (``ServeConfig``), importable without the serve extra
    app.py       routes, admission control, graceful shutdown
    loop.py      the one thread that steps the engine's scheduler and hands tokens back to asyncio
    protocol.py  OpenAI's request models and response shapes
    metrics.py   Prometheus metrics under vLLM's names

Torch-free: it imports the runtime, the base layer, and the ``serve`` extra (fastapi, uvicorn, sse-starlette,
prometheus-client).
"""

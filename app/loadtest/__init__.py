"""A load tester for any OpenAI-compatible deployment: `python -m app.loadtest --help`.

TTFT, TPOT and end-to-end latency percentiles, multi-round conversations with the engine's
prefix-cache hit rate per round, and two URLs side by side. See the README's "Load testing".
"""

"""vLLM Inference API: a thin, measured, OpenAI-compatible proxy in front of a stock inference engine."""

__version__ = "0.1.0"

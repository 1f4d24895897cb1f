"""Model as a service: the OpenAI-compatible API over the engine, with keys, usage ledger, rate limits, metrics."""

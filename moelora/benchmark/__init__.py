"""`moelora bench latency | throughput | serve`: end-to-end benchmarks with fresh prompts, dummy weights
and adapters, per-step engine timestamps, and the byte floor beside every decode row."""

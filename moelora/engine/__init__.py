"""The engine: requests, scheduling, sampling and detokenization around the model."""

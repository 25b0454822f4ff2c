"""Parallel layout: who owns what (sharding), the frozen per-process state, and the collectives."""

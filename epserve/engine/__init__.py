"""Batching, KV cache, the lockstep step loop and routing-trace recording."""

"""Moving tokens between EP ranks: topology, primitives, dispatchers, counters."""

"""Process entry points: the epserve console script, the torchrun worker, multi-node wiring."""

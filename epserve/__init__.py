"""epserve: expert-parallel serving of Mixture-of-Experts models."""

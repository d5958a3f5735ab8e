"""The tiny random checkpoints of the tests: they live in the library (epserve/training/tiny_models.py), so the
benchmarks import them from there and never from tests/; this module re-exports them for the tests."""

from epserve.training.tiny_models import *  # noqa: F401,F403
from epserve.training.tiny_models import edit_config, hf_config, load_hf_model, make_tiny_checkpoint  # noqa: F401

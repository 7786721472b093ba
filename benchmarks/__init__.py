"""Benchmarks of kdpm2 against diffusers' KDPM2DiscreteScheduler: ``python -m benchmarks`` (see run.py)."""

"""The kdpm2 conformance suite: run it on any backend with ``pytest --pyargs kdpm2core.testing --kdpm2-backend=NAME``."""

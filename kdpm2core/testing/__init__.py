"""The kdpm2 conformance suite: one set of tests that every backend must pass, identically.

Run it on one backend with ``kdpm2 conformance NAME``, ``pytest --pyargs kdpm2core.testing --kdpm2-backend=NAME``
or :func:`run`; a plain ``pytest`` in the kdpm2 repository runs it on every installed backend. The backend x
device x dtype matrix comes from the plugin registry (:mod:`kdpm2core.testing.plugin`). The suite needs
pytest, hypothesis and NumPy; it never imports diffusers, torch or jax unless the backend under test does.

Modules: ``test_backend_protocol`` (the backend object; run first, see :mod:`kdpm2core.testing.plugin`),
``test_diffusers_reference`` (stored diffusers data over 512 option combinations), ``test_exact`` (an
independent float64 reference and a Gaussian with an exact solution: convergence order), ``test_properties``
(hypothesis invariants), ``test_sampling`` (shapes, dtypes, devices, no in-place writes, agreement with NumPy),
``test_scheduler_api`` (``scale_model_input``, ``add_noise``, ``set_begin_index``, config round trips),
``test_functional_api`` (the functional API against the scheduler, churn, ``start=``, ``out=``),
``test_checkpoints`` (save, load and resume), ``test_noise`` (the counter-based noise of
:mod:`kdpm2core.noise`: the same values as NumPy's, batch invariance, statistics), ``test_ancestral`` (DPM2 a:
exact Gaussian moments after every substep, the functional step equal to the scheduler's).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["run"]


def run(backend: str, extra_args: Sequence[str] = ()) -> int:
    """Run the conformance suite on ``backend`` (every device it reports); returns pytest's exit code.

    The caller's pytest configuration files are ignored (``-c`` an empty file), so the result depends only
    on the backend; ``extra_args`` go to pytest as they are (e.g. ``["-x", "-q", "-k", "sampling"]``).
    """
    import pytest

    here = os.path.dirname(os.path.abspath(__file__))
    args = [
        "-c",
        os.devnull,
        "--rootdir",
        here,
        "-p",
        "no:cacheprovider",
        "--pyargs",
        "kdpm2core.testing",
        f"--kdpm2-backend={backend}",
    ]
    return int(pytest.main([*args, *extra_args]))

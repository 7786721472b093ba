"""pytest plugin (``pytest11`` entry point ``kdpm2``): options and fixtures of the conformance suite."""


def pytest_addoption(parser):
    group = parser.getgroup("kdpm2", "kdpm2 conformance suite")
    group.addoption(
        "--kdpm2-backend",
        action="append",
        default=None,
        help="run the conformance suite on this backend only (repeatable); default: every available backend",
    )

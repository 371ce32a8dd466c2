"""The suite's two streams (tests/conftest.py) hold together."""
import pytest


def test_streams_keep_their_tests_together(request):
    """Under `./quickstart test` (-n 2 --dist loadgroup) each stream's tests
    go to one worker, in order: booted-system tests depend on the ones before
    them. pytest-xdist does that by tagging node ids with the group, which it
    could not do with pytest 9 (tests then ran split and out of order:
    pyproject.toml holds pytest below 9)."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run as streams (-n 0, or no pytest-xdist)")
    assert request.node.nodeid.endswith("@host"), request.node.nodeid

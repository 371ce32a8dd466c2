import os
import shutil

import pytest

from harness import Daemon, PrivateBus, can_bpf, private_directory

BPF_OK, BPF_WHY = can_bpf()
needs_bpf = pytest.mark.skipif(not BPF_OK, reason=BPF_WHY)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

# `./quickstart test` runs the suite as two streams side by side (pytest-xdist,
# `-n 2 --dist loadgroup`): the packaging and booted-system tests, which spend
# their time building .debs and in apt and systemd inside a container, and
# everything else on the host. Each stream runs its tests in order, one at a
# time, as a plain run would.
PACKAGING_STREAM = {"test_packaging.py", "test_packaging_booted.py", "test_products_booted.py"}


@pytest.hookimpl(tryfirst=True)        # before pytest-xdist's, which tags node ids with the group
def pytest_collection_modifyitems(config, items):
    for item in items:
        stream = "packaging" if item.path.name in PACKAGING_STREAM else "host"
        item.add_marker(pytest.mark.xdist_group(stream))


@pytest.fixture
def workdir():
    # Not tmp_path: unprivileged test clients must reach sockets here by name
    # (0711: traversable, not listable). Removed after the test's daemons stop.
    d = private_directory()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon_factory(workdir):
    started: list[Daemon] = []

    def make(*flags, start=True, **kw) -> Daemon:
        d = Daemon(workdir, *flags, **kw)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.stop()


@pytest.fixture(scope="module")
def bpf_daemon():
    """One BPF-enabled daemon shared by the read-only tests of a module."""
    if not BPF_OK:
        pytest.skip(BPF_WHY)
    d = private_directory()
    daemon = Daemon(d).start()
    yield daemon
    daemon.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def vajra_group():
    """Group vajra, as the package makes it; removed after the test if the
    test added it. Request it before the daemon's fixture: the daemon gives
    its socket to the group when it creates it."""
    import grp
    import subprocess
    try:
        yield grp.getgrnam("vajra").gr_gid
        return
    except KeyError:
        pass
    subprocess.run(["groupadd", "--system", "vajra"], check=True)
    try:
        yield grp.getgrnam("vajra").gr_gid
    finally:
        subprocess.run(["groupdel", "vajra"], check=False)


@pytest.fixture
def private_bus():
    bus = PrivateBus()
    yield bus
    bus.close()

import os
import tempfile

import pytest

from harness import Daemon, PrivateBus, can_bpf

BPF_OK, BPF_WHY = can_bpf()
needs_bpf = pytest.mark.skipif(not BPF_OK, reason=BPF_WHY)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture
def workdir():
    # Not tmp_path: unprivileged test clients must be able to reach sockets here.
    d = tempfile.mkdtemp(prefix="vajra-test-")
    os.chmod(d, 0o755)
    yield d


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
    d = tempfile.mkdtemp(prefix="vajra-test-")
    os.chmod(d, 0o755)
    daemon = Daemon(d).start()
    yield daemon
    daemon.stop()


@pytest.fixture
def private_bus():
    bus = PrivateBus()
    yield bus
    bus.close()

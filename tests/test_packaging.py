"""Packaging truth without booting anything: a non-editable pip install runs
outside the checkout, the runtime dependency list has one home that matches
the code, the .deb builds lintian-clean, the man pages follow the programs,
and a kernel that refuses bpf() is named as such."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import needs_bpf, needs_root
from harness import REPO, Daemon, can_bpf

RUNTIME_LIST = REPO / "scripts" / "runtime-packages"
BPF_FILES = sorted(p.name for p in (REPO / "bpf").iterdir() if p.suffix in (".c", ".h"))
# Imported by a dependency rather than by vajrad itself, and why it is listed.
INDIRECT = {"six": "thrift"}


def runtime_packages() -> dict[str, str]:
    """package -> the module it provides, from scripts/runtime-packages."""
    found = {}
    for line in RUNTIME_LIST.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            package, module = words
            found[package] = module
    return found


def third_party_imports() -> dict[str, set[str]]:
    """Top-level modules vajrad/ imports that are neither the standard
    library nor vajrad, with the files importing each."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "vajrad").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "vajrad":
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_runtime_list_is_exactly_what_vajrad_imports():
    listed = runtime_packages()
    imported = third_party_imports()
    direct = {m for m in listed.values() if m not in INDIRECT}
    assert direct == set(imported), (
        f"scripts/runtime-packages lists {sorted(direct)} but vajrad/ imports {sorted(imported)}")
    for module, user in INDIRECT.items():
        assert module in listed.values() and user in imported


def test_listed_indirect_dependency_is_really_needed():
    """python3-thrift imports six without depending on it: the reason six is on the list."""
    import thrift
    sources = " ".join(p.read_text(errors="replace") for p in Path(thrift.__file__).parent.rglob("*.py"))
    assert re.search(r"^\s*(import six|from six)", sources, re.M), "thrift no longer imports six: drop it"


def test_bootstrap_and_debian_read_the_one_list():
    bootstrap = (REPO / "scripts" / "bootstrap").read_text()
    assert "scripts/runtime-packages" in bootstrap
    code = "\n".join(line.split("#", 1)[0] for line in bootstrap.splitlines())
    assert not re.search(r"\bpython3-(?!venv\b|pip\b)[a-z0-9-]+", code), \
        "scripts/bootstrap names a runtime package itself"
    rules = (REPO / "debian" / "rules").read_text()
    control = (REPO / "debian" / "control").read_text()
    assert "scripts/runtime-packages" in rules and "${vajra:Depends}" in control
    assert not re.search(r"^\s+python3-(?!all\b|setuptools\b)", control, re.M), \
        "debian/control names a runtime package itself"


def test_pyproject_installs_every_bpf_source():
    import tomllib
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    assert sorted(Path(f).name for f in data["share/vajra/bpf"]) == BPF_FILES


@needs_bpf
def test_pip_install_outside_the_checkout_reaches_ready():
    """`pip install .` (not editable) into a fresh venv on the system Python;
    vajrad from that venv, started outside the checkout, finds every BPF source
    in the install and attaches its collectors."""
    work = Path(tempfile.mkdtemp(prefix="vajra-pip-"))
    try:
        src = work / "src"
        tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                 cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
        for rel in filter(None, tracked):
            if (REPO / rel).is_file():
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, src / rel)
        venv = work / "venv"
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
        # The venv's own setuptools builds it: no index needed.
        r = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-build-isolation",
                            "--disable-pip-version-check", str(src)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        shutil.rmtree(src)          # nothing may come from the source tree now
        installed = venv / "share/vajra/bpf"
        assert sorted(p.name for p in installed.iterdir()) == BPF_FILES
        where = subprocess.run([str(venv / "bin/python"), "-c", "import vajrad; print(vajrad.__file__)"],
                               cwd=work, capture_output=True, text=True, check=True).stdout
        assert where.startswith(str(venv)), where

        run = work / "run"
        run.mkdir()
        daemon = Daemon(str(run), "--enable_file_events=false")
        # as an admin would run it: the installed entry point, from elsewhere
        _start_installed(daemon, venv / "bin/vajrad", cwd=str(run))
        try:
            status = daemon.call("status")
            assert status["collectors"]["process"]["state"] == "running", status
        finally:
            assert daemon.stop() == 0, daemon.log
        assert str(REPO) not in daemon.log
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _start_installed(daemon: Daemon, program: Path, cwd: str) -> None:
    import time
    from harness import NotifyListener
    daemon.notify = NotifyListener(tempfile.mkdtemp(dir=daemon.workdir))
    env = {k: v for k, v in daemon.env.items() if k not in ("PYTHONPATH", "VAJRA_BPF_DIR", "VIRTUAL_ENV")}
    env.update(NOTIFY_SOCKET=daemon.notify.path, PYTHONUNBUFFERED="1")
    daemon._stderr = open(daemon.stderr_path, "w")
    t0 = time.monotonic()
    daemon.proc = subprocess.Popen([str(program), *daemon.flags], env=env, cwd=cwd,
                                   stdout=daemon._stderr, stderr=subprocess.STDOUT)
    daemon.notify.wait_for("READY=1", 120, daemon.proc)
    daemon.ready_after = time.monotonic() - t0


@needs_root
def test_deb_builds_lintian_clean(tmp_path):
    """`make deb`'s script: dpkg-buildpackage, then lintian failing on any
    error or warning; the Depends are the one list."""
    r = subprocess.run(["sh", str(REPO / "scripts/build-deb"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    deb = r.stdout.strip().splitlines()[-1]
    depends = subprocess.run(["dpkg-deb", "-f", deb, "Depends"], capture_output=True, text=True,
                             check=True).stdout
    names = {d.strip().split()[0] for d in depends.split(",")}
    assert set(runtime_packages()) <= names, depends
    listing = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True).stdout
    for name in BPF_FILES:
        assert f"./usr/share/vajra/bpf/{name}" in listing


def test_man_pages_follow_the_programs():
    sys.path.insert(0, str(REPO / "man"))
    try:
        import render
    finally:
        sys.path.pop(0)
    for name, make in render.PAGES.items():
        assert (REPO / "man" / name).read_text() == make(), f"man/{name} is stale: run python3 man/render.py"


SECCOMP = str(REPO / "tests" / "seccomp_deny_bpf.py")


@needs_root
def test_a_kernel_that_refuses_bpf_is_named_and_the_tests_skip(workdir):
    """Where bpf() is denied (a container's seccomp filter), vajrad says the
    kernel refused bpf() rather than that compiling failed, and can_bpf()
    gives that as the reason to skip."""
    if not can_bpf()[0] and "refused bpf()" not in can_bpf()[1]:
        pytest.skip(can_bpf()[1])
    d = Daemon(workdir, env={"PYTHONPATH": str(REPO)}, prefix=[sys.executable, SECCOMP])
    d.start(wait_ready=False)
    assert d.proc.wait(60) == 1
    d.stop()
    assert "the kernel refused bpf() (EPERM" in d.log and "compile" not in d.log, d.log
    out = subprocess.run([sys.executable, SECCOMP, sys.executable, "-c",
                          "import sys; sys.path[:0] = ['tests', '.']\n"
                          "from harness import can_bpf; print(can_bpf())"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "(False, 'the kernel refused bpf() (EPERM" in out.stdout, out.stdout + out.stderr

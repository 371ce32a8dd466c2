"""The compiler (LLVM, clang) is not carried for the daemon's life: its pages
are handed back once the BPF programs are loaded, and compiling again (a
reload that starts a collector) still works."""
import json
import os
import subprocess
import sys

from conftest import needs_bpf
from harness import REPO

MIB = 1024


def compiler_kib(pid) -> dict:
    """Rss and Anonymous (kB) of the compiler libraries' mappings in pid."""
    total = {"Rss": 0, "Anonymous": 0}
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                inside = len(head) > 5 and os.path.basename(head[5]).startswith(("libLLVM", "libclang"))
            elif inside and head[0][:-1] in total:
                total[head[0][:-1]] += int(head[1])
    return total


CHILD = r"""
import json, shutil, sys, tempfile
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from bcc import BPF
from test_memory import compiler_kib
from vajrad.kernel.compiler_memory import release_compiler_pages
from vajrad.kernel.environment import probe

runtime = tempfile.mkdtemp(prefix="vajra-test-")
probe(runtime)                # the header tree BCC compiles against, as vajrad finds it

PROGRAM = b'TRACEPOINT_PROBE(sched, sched_process_exit) { return 0; }'
first = BPF(text=PROGRAM)
loaded = compiler_kib("self")
dropped = release_compiler_pages()
released = compiler_kib("self")
again = BPF(text=PROGRAM.replace(b"return 0", b"return args->pid == 1"))   # the compiler after release
print(json.dumps({"loaded": loaded, "released": released, "dropped": dropped,
                  "again_attached": again.num_open_tracepoints()}))
first.cleanup(); again.cleanup()
shutil.rmtree(runtime)
"""


@needs_bpf
def test_release_drops_the_compilers_clean_pages_and_it_still_compiles():
    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.splitlines()[-1])
    file_backed = {k: v["Rss"] - v["Anonymous"] for k, v in r.items() if k in ("loaded", "released")}
    assert file_backed["loaded"] > 20 * MIB, r           # compiling touched the libraries
    assert file_backed["released"] < 2 * MIB, r          # and those pages are gone
    # What the dynamic linker relocated is private and kept, untouched.
    assert r["released"]["Anonymous"] == r["loaded"]["Anonymous"]
    assert r["dropped"] >= (file_backed["loaded"] - file_backed["released"]) * 1024 // 2
    assert r["again_attached"] == 1


@needs_bpf
def test_daemon_under_load_does_not_carry_the_compiler(bpf_daemon):
    for _ in range(200):
        subprocess.run(["/bin/true"], check=True)
    mem = compiler_kib(bpf_daemon.proc.pid)
    assert mem["Rss"] - mem["Anonymous"] < 4 * MIB, mem
    assert bpf_daemon.call("ping") == "pong"

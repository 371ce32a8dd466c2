"""Hands back the memory BCC's compiler leaves mapped once the programs are loaded.

BCC compiles in-process with LLVM and clang (libLLVM, libclang-cpp: over
100 MB of code and read-only data). Compiling touches some 75 MB of it, and
those pages stay in the daemon's RSS for its whole life although nothing runs
them again until the next compile (a reload that starts a collector).

What is dropped, and why it is safe: only pages of the compiler libraries'
*non-writable* mappings (code, read-only data) that are still the file's own
pages (pagemap's file-page bit). Such a page is an unmodified copy of the
file: MADV_DONTNEED unmaps it and the next touch faults the same bytes back
in from the file. Pages the dynamic linker wrote (relocations in RELRO, now
read-only, but anonymous copies) are kept: dropping those would lose the
relocations. Writable mappings are left alone, so no concurrent write can be
lost between reading pagemap and madvise. Then POSIX_FADV_DONTNEED asks the
kernel to drop the libraries' page cache no one maps any more, which is what
a memory cgroup (systemctl status) charges the daemon for.

Compiling in a short-lived child and passing the program and map fds back
(SCM_RIGHTS) would also drop the ~10 MB of relocated data, but BCC's Python
API builds its tables from the module the compiler returned, in-process; see
docs/architecture.md ("Memory").
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os

log = logging.getLogger(__name__)

COMPILER_LIBRARIES = ("libLLVM", "libclang")      # basenames start with these
MADV_DONTNEED = 4
PAGEMAP_PRESENT = 1 << 63
PAGEMAP_FILE = 1 << 61          # file page or shared anonymous: not a private copy
PAGE = mmap.PAGESIZE


def compiler_mappings(maps: str = "/proc/self/maps") -> list[tuple[int, int, str, str]]:
    """(start, end, permissions, path) of the compiler libraries' mappings."""
    found = []
    with open(maps) as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 6:
                continue
            path = parts[5].strip()
            if not os.path.basename(path).startswith(COMPILER_LIBRARIES):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            found.append((start, end, parts[1], path))
    return found


def clean_file_runs(pagemap, start: int, end: int) -> list[tuple[int, int]]:
    """(address, length) runs of resident pages in [start, end) that are
    still the file's own pages."""
    pagemap.seek(start // PAGE * 8)
    raw = pagemap.read((end - start) // PAGE * 8)
    entries = memoryview(raw).cast("Q")
    runs: list[tuple[int, int]] = []
    run_start = None
    for i, entry in enumerate(entries):
        droppable = entry & PAGEMAP_PRESENT and entry & PAGEMAP_FILE
        if droppable and run_start is None:
            run_start = i
        elif not droppable and run_start is not None:
            runs.append((start + run_start * PAGE, (i - run_start) * PAGE))
            run_start = None
    if run_start is not None:
        runs.append((start + run_start * PAGE, (len(entries) - run_start) * PAGE))
    return runs


def release_compiler_pages() -> int:
    """Drops the compiler's clean, read-only pages from this process and its
    unmapped page cache; returns the bytes unmapped. Never raises: this is
    an economy, and a kernel without /proc/self/pagemap just keeps them."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        dropped = 0
        files = set()
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            for start, end, perms, path in compiler_mappings():
                files.add(path)
                if "w" in perms:
                    continue
                for address, length in clean_file_runs(pagemap, start, end):
                    if libc.madvise(address, length, MADV_DONTNEED) != 0:
                        log.debug("madvise on %s failed: %s", path, os.strerror(ctypes.get_errno()))
                        continue
                    dropped += length
        for path in files:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return dropped
    except (OSError, AttributeError) as e:
        log.debug("compiler pages kept: %s", e)
        return 0

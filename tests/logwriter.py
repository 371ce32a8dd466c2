"""A log-writing process for the logs tests and bench: appends numbered
lines to a file, reopening it on SIGHUP (logrotate's `create` + postrotate).

  python tests/logwriter.py PATH --lines N --rate R [--size BYTES]
      writes N lines at R lines/s, then exits 0.
  python tests/logwriter.py PATH --stdin
      obeys commands on stdin: "lines A B" writes lines A..B-1, "raw TEXT"
      writes TEXT as is (no newline added), "reopen"; answers "ok" to each.
"""
import argparse
import os
import signal
import sys
import time


def line(n: int, size: int) -> bytes:
    head = f"seq={n:09d} "
    return (head + "x" * max(0, size - len(head) - 1) + "\n").encode()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--lines", type=int, default=0)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--stdin", action="store_true")
    args = ap.parse_args()
    state = {"fd": os.open(args.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), "reopen": False}

    def reopen(*_):
        state["reopen"] = True
    signal.signal(signal.SIGHUP, reopen)

    def write(data: bytes) -> None:
        if state["reopen"]:
            state["reopen"] = False
            old = state["fd"]
            state["fd"] = os.open(args.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.close(old)
        os.write(state["fd"], data)

    if args.stdin:
        for command in sys.stdin:
            verb, _, rest = command.rstrip("\n").partition(" ")
            if verb == "lines":
                a, b = map(int, rest.split())
                write(b"".join(line(n, args.size) for n in range(a, b)))
            elif verb == "raw":
                write(rest.encode().decode("unicode_escape").encode())
            elif verb == "reopen":
                state["reopen"] = True
                write(b"")
            print("ok", flush=True)
        return 0
    # Paced in small bursts: the rate holds without a syscall per sleep.
    t0 = time.monotonic()
    burst = max(1, int(args.rate / 200))
    n = args.start
    end = args.start + args.lines
    while n < end:
        k = min(burst, end - n)
        write(b"".join(line(i, args.size) for i in range(n, n + k)))
        n += k
        ahead = (n - args.start) / args.rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
    return 0


if __name__ == "__main__":
    sys.exit(main())

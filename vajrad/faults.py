"""Fault injection, for the tests of the watchdog only.

Honoured only when vajrad is started with VAJRAD_TEST_FAULT set (the shipped
unit and every documented way of running vajrad leave it unset); vajrad then
says so in its log at start-up. With it set, SIGUSR2 injects the named fault
once per signal:

- `collector-thread:NAME`: the polling thread of collector NAME raises on its
  next poll and dies, as a bug in a decoder or a broken buffer would make it.
- `loop-block:SECONDS`: the event loop runs a blocking sleep of SECONDS, as a
  blocking call made on it by mistake would.

A dead store writer needs no hook: the tests hold the database's write lock
from another connection, which fails the writer's commits for real.
Nothing here is reachable without the environment variable: without it,
SIGUSR2 keeps its default action.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Callable

from vajrad.collectors.base import Collector, InjectedFault
from vajrad.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "VAJRAD_TEST_FAULT"
KINDS = ("collector-thread", "loop-block")


def parse(spec: str) -> tuple[str, str]:
    kind, _, arg = spec.partition(":")
    if kind not in KINDS or not arg:
        raise ConfigError(ENV, f"{spec!r}: expected one of " + ", ".join(f"{k}:ARG" for k in KINDS))
    if kind == "loop-block":
        try:
            if float(arg) <= 0:
                raise ValueError
        except ValueError:
            raise ConfigError(ENV, f"{spec!r}: loop-block takes a positive number of seconds") from None
    return kind, arg


def install(collectors: Callable[[], list[Collector]]) -> None:
    """On the event loop, after start-up; a no-op unless ENV is set."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    kind, arg = parse(spec)
    log.warning("fault injection is enabled (%s=%s): a test hook, never meant for a production daemon",
                ENV, spec)

    def inject() -> None:
        if kind == "loop-block":
            log.warning("injected fault: blocking the event loop for %s s", arg)
            time.sleep(float(arg))
            return
        for c in collectors():
            thread = getattr(c, "_thread", None)
            if c.name == arg and thread is not None:
                log.warning("injected fault: the %s collector's polling thread dies", arg)
                thread.inject_failure(InjectedFault(f"fault injected into the {arg} collector's poller"))
                return
        log.error("injected fault: no running collector %s with a polling thread", arg)

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, inject)

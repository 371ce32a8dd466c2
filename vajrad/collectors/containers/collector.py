"""The containers unit: keeps the cgroup map (bpf/cgroup.bpf.c), talks to the
runtimes, and answers `containers` and `container_events`; its
ContainerResolver is what the process, socket and file collectors fill their
container columns from."""
from __future__ import annotations

import asyncio
import json
import logging
import struct
import threading
import time

from vajrad.collectors.bpf import BpfCollector
from vajrad.enrich import runtimes as rt
from vajrad.enrich.containers import ContainerInfo, ContainerResolver, parse_cgroup_path
from vajrad.kernel import abi
from vajrad.kernel.environment import KernelEnv
from vajrad.kernel.program import BpfProgram
from vajrad.tables import TABLES

log = logging.getLogger(__name__)

EVENTS_TABLE = "container_events"
LIVE_TABLE = "containers"
# struct vajra_cgroup_event (bpf/cgroup.bpf.c): the process header, level, path_len, id, path
CGROUP_EVENT = struct.Struct(abi._HEADER_FORMAT + "iIQ512s")
_HEADER_FIELDS = len(struct.unpack(abi._HEADER_FORMAT, bytes(struct.calcsize(abi._HEADER_FORMAT))))
CG_MKDIR, CG_RMDIR = 1, 2
CATCH_UP_S = 0.2            # how long a lookup of an unknown cgroup waits for this collector's drain
ACTORS_MAX = 4096
ACTOR_SYNC_S = 1.0          # how long a container event waits for the process cache to know its actor


class ContainersCollector(BpfCollector):
    name = "containers"
    tables = (LIVE_TABLE, EVENTS_TABLE)
    table = EVENTS_TABLE
    poll_ms = 200

    def __init__(self, kenv: KernelEnv, output: str, resolver: ContainerResolver,
                 runtimes: list[rt.Runtime], process_cache=lambda: None):
        super().__init__(BpfProgram("cgroup.bpf.c", kenv, output,
                                    {"VAJRA_EXPECT_CGROUP_EVENT_SIZE": CGROUP_EVENT.size}))
        self.resolver = resolver
        self.runtimes = {r.name: r for r in runtimes}
        self.process_cache = process_cache          # () -> the process unit's ProcessCache, or None
        self._tasks: list[asyncio.Task] = []
        self._inspecting: set[tuple[str, str]] = set()     # (runtime client, container id)
        self._pods: dict[str, str] = {}
        self._actors: dict[str, tuple] = {}         # container id -> (pid, start_ns, ktime) of who made its cgroup
        self._drained = threading.Condition()
        self._drains = 0
        resolver.wanted = self._wanted
        resolver.cgroups.catch_up = self.catch_up

    # --- the cgroup map (polling thread) --------------------------------------
    def row(self, buf, off: int, size: int) -> None:
        fields = CGROUP_EVENT.unpack_from(buf, off)
        kind, ktime, start, pid = fields[0], fields[2], fields[3], fields[5]
        _level, plen, cgid, raw = fields[_HEADER_FIELDS:]
        path = raw[:max(plen - 1, 0)].decode("utf-8", "surrogateescape") or "/"
        cgroups = self.resolver.cgroups
        if kind == CG_MKDIR:
            cgroups.mkdir(cgid, path)
            found = parse_cgroup_path(path)
            if found is not None and found.container_id not in self._actors:
                # The process making a container's cgroup (the OCI runtime):
                # its lineage, through parents it was born to, leads to whoever
                # ran the container. Looked up when the container's events
                # come, once the process cache has caught up with it.
                if len(self._actors) > ACTORS_MAX:
                    self._actors.clear()
                self._actors[found.container_id] = (pid, start, ktime)
        elif kind == CG_RMDIR:
            cgroups.rmdir(cgid, path)
        return None

    def _after_poll(self, final: bool = False) -> None:
        with self._drained:
            self._drains += 1
            self._drained.notify_all()

    def catch_up(self) -> None:
        """On another collector's thread, for a cgroup id the map lacks: have
        this collector drain once more (the cgroup may have been made a
        moment ago) and wait for it, briefly."""
        if self._thread is None:
            return
        with self._drained:
            target = self._drains + 2     # one drain may have started before the cgroup was made
            self.program.nudge()
            self._drained.wait_for(lambda: self._drains >= target, CATCH_UP_S)

    async def prepare(self) -> None:
        walked = await asyncio.to_thread(self.resolver.cgroups.walk)
        log.info("cgroup map: %d cgroups under %s", walked, self.resolver.cgroups.root)

    # --- runtimes (event loop) ------------------------------------------------
    async def start(self) -> None:
        await super().start()
        for runtime in self.runtimes.values():
            self._tasks.append(asyncio.create_task(self._follow(runtime), name=f"vajra-runtime-{runtime.name}"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []
        await super().stop()

    def _wanted(self, cid: str, runtime: str) -> None:
        """A container met in an event before its metadata (polling thread)."""
        if self._loop is not None and any(r.serves(runtime) for r in self.runtimes.values()):
            self._loop.call_soon_threadsafe(self._inspect_soon, cid, runtime)

    def _inspect_soon(self, cid: str, runtime: str) -> None:
        for client in self.runtimes.values():
            if not client.serves(runtime) or not client.connected:
                continue        # the list and the replayed events on reconnect will tell
            key = (client.name, cid)
            if key in self._inspecting:
                continue
            self._inspecting.add(key)
            task = asyncio.create_task(self._inspect(client, cid))
            self._tasks.append(task)
            task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _inspect(self, client: rt.Runtime, cid: str) -> None:
        try:
            info = await client.inspect(cid)
            if info is not None:
                await self._learn(client, info)
        except rt.RuntimeApiError as e:
            log.debug("%s", e)
        finally:
            self._inspecting.discard((client.name, cid))

    async def _learn(self, client: rt.Runtime, info: ContainerInfo) -> ContainerInfo:
        if info.runtime == "podman" and info.pod_uid and not info.pod_name \
                and "io.kubernetes.pod.name" not in info.labels:
            name = self._pods.get(info.pod_uid)
            if name is None:
                name = await client.pod_name(info.pod_uid)
                if name:
                    self._pods[info.pod_uid] = name
            info.pod_name = name or ""
        return self.resolver.learn(info)

    async def _follow(self, client: rt.Runtime) -> None:
        """List, then follow the runtime's events; on any failure, count it,
        wait and start over (events missed meanwhile are replayed: since= on
        the /events streams, a fresh list against the last one for CRI)."""
        warned = False
        while True:
            if not client.available():
                await asyncio.sleep(rt.RETRY_S)
                continue
            try:
                for info in await client.list():
                    await self._learn(client, info)
                self._source_up(client)
                async for action, info, code, when in client.follow_events():
                    await self._event(client, action, info, code, when)
            except rt.RuntimeApiError as e:
                client.errors += 1
                client.last_error = str(e)
                if not warned:
                    log.warning("%s", e)
                    warned = True
            except asyncio.CancelledError:
                client.connected = False
                await client.close()
                raise
            except Exception:           # a malformed answer must not end the follower
                client.errors += 1
                log.exception("%s: unexpected failure following the runtime", client.name)
            client.connected = False
            await client.close()
            await asyncio.sleep(rt.RETRY_S)

    def _source_up(self, client: rt.Runtime) -> None:
        client.connected = True
        if not client.ever_connected:
            client.ever_connected = True
            self.resolver.sources[client.name] = client
            for alias in client.aliases:            # CRI: kubepods cgroups that name no runtime
                self.resolver.sources.setdefault(alias, client)
            self.resolver.forget_answers()
            log.info("%s: metadata from %s", client.name, client.socket)

    async def _event(self, client: rt.Runtime, action: str | None, info: ContainerInfo, code: int,
                     when: int) -> None:
        inspect_later = False
        if action in ("create", "start") and not info.image_id and client.connected:
            known = self.resolver.known(info.id)
            if not info.complete and (known is None or not known.complete):
                # No name or image yet: the event row needs them now.
                try:
                    full = await client.inspect(info.id)
                except rt.RuntimeApiError as e:   # counted by the client; the event stands on its own
                    log.debug("%s", e)
                    full = None
                if full is not None:
                    info.merge(full)
                    info.complete = True
            elif action == "start" and (known is None or not known.image_id):
                # Events name the container and its image, not the image id,
                # pid or privileges: one inspect at its start, off the stream,
                # so that a busy runtime's slow answers do not delay the events
                # behind (a /bin/true container may be gone already: its event
                # data stays).
                inspect_later = True
        info = await self._learn(client, info)
        if inspect_later:
            self._inspect_soon(info.id, client.name)
        if action is None:
            return
        actor = await self._actor(info.id)
        proc = actor.get("process") or {}
        row = TABLES[EVENTS_TABLE].row(
            container_id=info.id, runtime=info.runtime, action=action, container_name=info.name,
            container_image=info.image, pod_name=info.pod_name, pod_namespace=info.pod_namespace,
            pod_uid=info.pod_uid, exit_code=code if action == "die" else None,
            pid=actor.get("pid"), path=proc.get("path", ""),
            cmdline=proc.get("cmdline", ""), ancestry=json.dumps(actor.get("ancestry", [])),
            time=when)
        if self._queue is not None:
            self._enqueue((EVENTS_TABLE, [row]))

    async def _actor(self, cid: str) -> dict:
        """{"pid", "process", "ancestry"} of the process that made the
        container's cgroup, as the process cache knows it; {} without one."""
        made = self._actors.get(cid)
        cache = self.process_cache()
        if made is None or cache is None:
            return {}
        pid, start, ktime = made
        deadline = time.monotonic() + ACTOR_SYNC_S
        while cache.synced_ns < ktime and time.monotonic() < deadline:
            cache.request_sync()
            await asyncio.sleep(0.05)
        with cache.lock:
            lineage = json.loads(cache.ancestry(pid, start))
        if not lineage:
            return {"pid": pid}
        return {"pid": pid, "process": lineage[0], "ancestry": lineage[1:]}

    # --- tables ------------------------------------------------------------------
    def snapshots(self) -> dict:
        return {LIVE_TABLE: self._live_rows}

    def _live_rows(self) -> list[dict]:
        table = TABLES[LIVE_TABLE]
        return [table.row(
            id=c.id, runtime=c.runtime, name=c.name, image=c.image, image_id=c.image_id, state=c.state,
            pid=c.pid, cgroup_id=c.cgroup_id, cgroup_path=c.cgroup_path, pod_name=c.pod_name,
            pod_namespace=c.pod_namespace, pod_uid=c.pod_uid, labels=json.dumps(c.labels, sort_keys=True),
            privileged=c.privileged, created=c.created, started=c.started, deleted=c.deleted,
            first_seen=c.first_seen) for c in self.resolver.snapshot()]

    def stats(self) -> dict:
        s = super().stats()
        s.update(self.resolver.stats())
        s["runtimes"] = {name: r.stats() for name, r in self.runtimes.items()}
        return s

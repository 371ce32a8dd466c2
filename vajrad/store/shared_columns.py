"""Shared columns: large values that many rows repeat, stored once.

A column declared `shared` (schema.Column) lives in a side table,
"<table>__<column>", and rows hold its id in "<column>_ref"; reads put the
text back (`column_sql`, and the views the store keeps for SQL readers).

Two kinds of value are understood, and nothing else of them:
- a plain str, kept whole, once per distinct text (depth 0);
- a *chained JSON array*: a str holding a JSON array that also carries
  `.node`, a `ChainNode` whose `entry` is the array's first element and whose
  `rest` is the node of the array without it. Such a value is kept as its
  chain, one side row per node (value: the entry, parent: the next node,
  depth: how many elements the array has from here), so arrays that share
  their tails share their rows; reading joins the entries back with commas
  between brackets. Ancestry (vajrad/enrich/process_cache.py) is one such
  value; the store knows nothing else about it.

Side rows are grouped in generations: a generation's rows are only pointed at
by event rows, and by side rows, written during it (a value still in use is
written again in the next one), so once retention has removed those event
rows the whole generation goes, by id range, with no reference counting.
"""
from __future__ import annotations

import sqlite3
import time
from typing import Protocol

from vajrad.schema import Table

SHARED_MEMO_MAX = 20_000         # distinct whole values remembered by the writer


class ChainNode(Protocol):
    """What a chained JSON array's nodes offer the store."""
    entry: str                   # one element of the array, as JSON text
    rest: "ChainNode | None"     # the node of the remaining elements
    depth: int                   # elements from this node to the array's end
    stored: dict | None          # the store's bookkeeping (side-row ids per column); starts None


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def read_view(table: str) -> str:
    """The view SQL readers query a table through (see EventStore)."""
    return f"{table}__read"


def side_table(table: str, column: str) -> str:
    return f"{table}__{column}"


def column_sql(table: Table, name: str, alias: str = "t") -> str:
    """The SQL expression that reads a column back, shared or not. Rows stored
    before the column was shared keep their text in the column itself."""
    column = table.column(name)
    if not column.shared:
        return f"{alias}.{quote(name)}"
    side = quote(side_table(table.name, name))
    # The node chain from the row's side row, `depth` nodes long; a whole
    # value (depth 0, or NULL from before chains) is its own text.
    return (f"COALESCE((WITH RECURSIVE chain(n, value, parent, depth) AS ("
            f"SELECT 0, s.value, s.parent, COALESCE(s.depth, 0) FROM {side} s "
            f"WHERE s.id = {alias}.{quote(name + '_ref')} "
            f"UNION ALL SELECT c.n + 1, s.value, s.parent, c.depth - 1 FROM chain c "
            f"JOIN {side} s ON s.id = c.parent WHERE c.depth > 1) "
            f"SELECT CASE WHEN MAX(depth) = 0 THEN MAX(value) ELSE '[' || group_concat(value, ',') || ']' END "
            f"FROM (SELECT value, depth FROM chain ORDER BY n)), {alias}.{quote(name)})")


class SharedColumnWriter:
    """The writer's side of one shared column: values and nodes -> ids, in
    generations. Side rows are queued in `rows` and go in with the batch."""

    def __init__(self, table: str, column: str, position: int):
        self.column, self.position = column, position
        self.insert_sql = (f"INSERT INTO {quote(side_table(table, column))} (id, value, parent, depth) "
                           f"VALUES (?, ?, ?, ?)")
        self.ids: dict[str, int] = {}
        self.rows: list[tuple] = []
        self.next_id = 1
        self.floor = 1                   # first id of the current generation
        self.closed: list[tuple[int, int, int]] = []   # (first id, end id, last event eid)
        self.started = time.monotonic()
        # Names this column in the nodes' `stored` (a node may be in the side
        # tables of several event tables); a new token forgets them all.
        self.token = object()

    def ref(self, value) -> int | None:
        if value is None:
            return None
        node = getattr(value, "node", None)
        if node is not None:
            stored = node.stored        # the common case: a chain written already
            if stored is not None:
                found = stored.get(self.token)
                if found is not None and found >= self.floor:
                    return found
            return self._node_ref(node)
        found = self.ids.get(value)
        if found is not None and found >= self.floor:
            return found
        if len(self.ids) >= SHARED_MEMO_MAX:
            self.ids.clear()
        n = self._add(value, None, 0)
        self.ids[value] = n
        return n

    def _node_ref(self, node) -> int:
        """The id of a node (its chain written first where it is not yet in
        this generation); iterative, since a chain may be deep."""
        token, floor = self.token, self.floor
        todo = []
        parent = None
        while node is not None:
            stored = node.stored
            if stored is not None:
                parent = stored.get(token)
                if parent is not None and parent >= floor:
                    break
                parent = None
            todo.append(node)
            node = node.rest if node.depth > 1 else None
        for node in reversed(todo):
            parent = self._add(node.entry, parent, node.depth)
            if node.stored is None:
                node.stored = {}
            node.stored[token] = parent
        return parent

    def _add(self, value: str, parent: int | None, depth: int) -> int:
        n = self.next_id
        self.rows.append((n, value, parent, depth))
        self.next_id = n + 1
        return n

    def flush(self, conn: sqlite3.Connection) -> None:
        if self.rows:
            conn.executemany(self.insert_sql, self.rows)
            self.rows = []

    def forget(self) -> None:
        """After a rolled-back batch: nothing it wrote exists."""
        self.ids.clear()
        self.rows = []
        self.token = object()

    def rotate(self, last_eid: int) -> None:
        """Closes the current generation; rows up to last_eid are its users."""
        if self.next_id > self.floor:
            self.closed.append((self.floor, self.next_id, last_eid))
        self.floor, self.started = self.next_id, time.monotonic()



"""One module per table; each defines TABLE (see vajrad/schema.py)."""
from vajrad.schema import (BIGINT, CONTAINER_COLUMNS, INTEGER, NET_NAMESPACE_COLUMN, PID_MNT_NAMESPACE_COLUMNS,
                           TEXT, Column, Table)

TABLE = Table.events(
    "log_events",
    "Lines of application log files (log_files) and of the journal (journal), one row each, read "
    "exactly once through rotation, truncation and restarts; with the rule that matched, and the "
    "process that last opened the file for writing.",
    (
        Column("source", TEXT, "file or journal"),
        Column("category", TEXT, "The log_files (or journal) category that reads it"),
        Column("action", TEXT, "line; truncated (the file shrank or was rewritten under us: read again "
                               "from 0; also a tamper signal); cursor_lost (journal: the saved cursor was "
                               "vacuumed, reading resumed at the oldest entry)"),
        Column("path", TEXT, "The file's path when the line was read (its rotated name once rotated)"),
        Column("inode", BIGINT, "The file's inode"),
        Column("offset", BIGINT, "Byte offset of the line's start in the file (truncated: the offset "
                                 "reached before the truncation)"),
        Column("line", TEXT, "The line, without its newline (and CR); invalid bytes replaced by U+FFFD"),
        Column("partial", INTEGER, "1 when the line lacks its end (flushed without a newline after "
                                   "partial_timeout_ms or at rotation) or its start (it continues such a line)"),
        Column("cut", INTEGER, "1 when the line was longer than max_line_bytes and was cut there"),
        Column("replaced", INTEGER, "1 when invalid bytes for the encoding were replaced"),
        Column("rule", TEXT, "Name of the first rule whose regex matched, NULL when none did"),
        Column("severity", TEXT, "That rule's severity"),
        Column("fields", TEXT, "That rule's named groups as a JSON object"),
        Column("writer_pid", BIGINT, "Process that last opened the file for writing, from committed "
                                     "bpf_file_events rows (needs the file under a file_paths rule; NULL "
                                     "when none was seen)"),
        Column("writer_path", TEXT, "That process's executable"),
        Column("writer_ancestry", TEXT, "That process's ancestry, JSON, as in bpf_file_events"),
        *CONTAINER_COLUMNS,
        *PID_MNT_NAMESPACE_COLUMNS,
        NET_NAMESPACE_COLUMN,
        Column("unit", TEXT, "journal: the systemd unit (_SYSTEMD_UNIT)"),
        Column("cursor", TEXT, "journal: the entry's cursor"),
    ),
    notes={
        "containers": "container_id ... pod_uid and the namespace inodes are the writer's (writer_pid): "
                      "from its bpf_file_events row, or from its cgroup and /proc/PID/ns when it was found "
                      "through /proc; empty when no writer is known (or it is a host process); NULL on "
                      "journal rows and truncated rows.",
    },
    summary=("category", "action", "path", "line", "rule", "severity"),
)

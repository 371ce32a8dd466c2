"""One module per table; each defines TABLE (see vajrad/schema.py)."""
from vajrad.schema import BIGINT, TEXT, Column, Table

TABLE = Table(
    "log_files",
    "The log files the logs unit follows or keeps known (so that none is read twice), live.",
    (
        Column("path", TEXT, "Current path (a rotated file's new name)"),
        Column("category", TEXT, "The log_files category"),
        Column("identity", TEXT, "device:inode:fingerprint size:fingerprint (first 16 hex digits of the "
                                 "SHA-256 of the first bytes)"),
        Column("inode", BIGINT, "Inode"),
        Column("offset", BIGINT, "First byte not yet read into a row (what the store has, once committed)"),
        Column("size", BIGINT, "Size when last looked at"),
        Column("lines", BIGINT, "Lines read this run"),
        Column("bytes", BIGINT, "Bytes read this run"),
        Column("state", TEXT, "reading, rotated (read to its end, then let go), copy-pending (a probable "
                              "copytruncate copy waiting on its original), done (read, let go), known"),
        Column("last_read", BIGINT, "When a line was last read, unix seconds"),
        Column("dropped", BIGINT, "Bytes cut off over-long lines this run"),
        Column("errors", BIGINT, "Lines with invalid bytes for the encoding this run"),
    ),
    evented=False,
)

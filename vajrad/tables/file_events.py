"""One module per table; each defines TABLE (see vajrad/schema.py)."""
from vajrad.schema import (BIGINT, CONTAINER_COLUMNS, INTEGER, NET_NAMESPACE_COLUMN, PID_MNT_NAMESPACE_COLUMNS,
                           TEXT, Column, Table)

TABLE = Table.events(
    "file_events",
    "Changes to watched files (file_paths), from inotify, as osquery's file_events: what "
    "changed, with its metadata and hashes, and the process that changed it when "
    "bpf_file_events saw the call.",
    (
        Column("target_path", TEXT, "The path that changed"),
        Column("category", TEXT, "The file_paths category that watches it"),
        Column("action", TEXT, "CREATED, UPDATED, DELETED, MOVED_FROM, MOVED_TO, ATTRIBUTES_MODIFIED; "
                               "OPENED and ACCESSED for file_accesses categories"),
        Column("transaction_id", BIGINT, "inotify's cookie: the same for the MOVED_FROM and MOVED_TO "
                                         "of one rename, 0 otherwise"),
        Column("inode", BIGINT, "Inode of the file"),
        Column("uid", BIGINT, "Owning user ID"),
        Column("gid", BIGINT, "Owning group ID"),
        Column("mode", TEXT, "Permission bits, octal"),
        Column("size", BIGINT, "Size in bytes"),
        Column("atime", BIGINT, "Last access time"),
        Column("mtime", BIGINT, "Last modification time"),
        Column("ctime", BIGINT, "Last status change time"),
        Column("md5", TEXT, "MD5 of the file's content (CREATED and UPDATED)"),
        Column("sha1", TEXT, "SHA1 of the file's content"),
        Column("sha256", TEXT, "SHA256 of the file's content"),
        Column("hashed", INTEGER, "1 hashed, 0 not hashed (other actions, not a regular file, larger "
                                  "than read_max), -1 hashing failed (gone or unreadable)"),
        Column("pid", BIGINT, "Process that made the change, from the bpf_file_events row behind it "
                              "(NULL when none was seen)"),
        Column("path", TEXT, "Executable of that process"),
        Column("bpf_eid", BIGINT, "eid of that bpf_file_events row"),
        *CONTAINER_COLUMNS,
        *PID_MNT_NAMESPACE_COLUMNS,
        NET_NAMESPACE_COLUMN,
    ),
    notes={
        "metadata": "inode, uid, gid, mode, size and times are read (lstat) when the event is "
                    "read, so a file deleted at once has them NULL.",
        "containers": "container_id ... pod_uid and the namespace inodes are those of the bpf_file_events "
                      "row behind the change (bpf_eid): empty (namespaces NULL) when none was seen, as for "
                      "a host process.",
        "UPDATED": "one row when a writer closes the file, or after a second of writes "
                   "without a close.",
    },
)

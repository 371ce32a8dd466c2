from vajrad.schema import BIGINT, Column, Table

TABLE = Table(
    "process_ancestry_cache_stats",
    "The process ancestry cache: one row, live.",
    (
        Column("cache_hits", BIGINT, "Ancestor lookups answered by the cache"),
        Column("cache_misses", BIGINT, "Ancestor lookups the cache could not answer (then /proc is tried)"),
        Column("cache_size", BIGINT, "Processes in the cache, running and recently exited (live_entries + exited_entries)"),
        Column("live_entries", BIGINT, "Running processes in the cache; never evicted, whatever max_size says"),
        Column("exited_entries", BIGINT, "Exited processes in the cache, at most max_size"),
        Column("evictions", BIGINT, "Exited processes pushed out because max_size of them were kept"),
        Column("expired_entries", BIGINT, "Exited processes dropped after process_ancestry_cache_ttl"),
        Column("vanished_entries", BIGINT,
               "Running entries dropped because /proc showed the process gone and its exit record was lost"),
        Column("held_images", BIGINT,
               "Images replaced by an exec, kept until the socket and file rows from before that exec are attributed"),
        Column("max_size", BIGINT, "process_ancestry_cache_size: exited processes kept at most"),
    ),
    evented=False,
)

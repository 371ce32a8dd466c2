from vajrad.schema import BIGINT, Column, Table

TABLE = Table(
    "process_ancestry_cache_stats",
    "The process ancestry cache: one row, live.",
    (
        Column("cache_hits", BIGINT, "Ancestor lookups answered by the cache"),
        Column("cache_misses", BIGINT, "Ancestor lookups the cache could not answer (then /proc is tried)"),
        Column("cache_size", BIGINT, "Processes in the cache, running and recently exited"),
        Column("evictions", BIGINT, "Processes pushed out because the cache was full"),
        Column("expired_entries", BIGINT, "Exited processes dropped after process_ancestry_cache_ttl"),
        Column("max_size", BIGINT, "process_ancestry_cache_size"),
    ),
    evented=False,
)

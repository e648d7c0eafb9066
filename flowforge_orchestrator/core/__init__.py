"""The pure core: definitions, expressions, run graphs, retry arithmetic, the records that
cross seams. No I/O: nothing here imports asyncpg, arq, redis, httpx or opentelemetry,
reads a clock or the environment."""

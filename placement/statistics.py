"""Planner statistics kept fresh while a catalog is bulk-loaded (PostgreSQL).

Bulk lookups bind their names as one array. PostgreSQL plans them from the statistics of
the table, and autovacuum gathers those only once a minute at best. Right after a bulk
load (a new catalog, a campaign registering a million files) a table has many more rows
than its statistics say: `scope = s` then looks selective, the names are tested as a
filter on every row of the scope instead of being probed in the index, and each lookup
grows with the table (attaching 1,000 files took 6 ms at 40,000 DIDs against 1.7 ms at
10,000). The server therefore analyses its own tables when they changed by more than a
tenth since their last analysis, every few seconds, off the request path. Autovacuum's
own rule is the same with a longer delay; this only shortens the delay.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine, text

from stashflow.placement.models import Base

log = logging.getLogger("stashflow.placement.statistics")

# Rows changed since the last analysis, at least, and as a share of the table's rows.
MIN_CHANGED = 1000
SHARE = 0.1

# Only tables we may analyse (owned by our role or one it belongs to): PostgreSQL skips
# the others with a mere warning, and they would be tried again at every check.
_STALE = text(
    "SELECT s.relname FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid "
    "WHERE s.schemaname = current_schema() AND pg_has_role(c.relowner, 'USAGE') "
    "AND s.n_mod_since_analyze >= :least "
    "AND s.n_mod_since_analyze >= :share * greatest(s.n_live_tup, 1) ORDER BY s.relname")


def refresh(engine: Engine) -> list[str]:
    """ANALYZE the catalog's tables whose statistics are stale; return their names.
    Does nothing on SQLite (its planner does not depend on gathered statistics)."""
    if engine.dialect.name != "postgresql":
        return []
    ours = set(Base.metadata.tables)
    with engine.connect() as conn:
        stale = [name for (name,) in conn.execute(_STALE, {"least": MIN_CHANGED,
                                                           "share": SHARE})
                 if name in ours]
        for name in stale:
            # a name from our own metadata, quoted: nothing from outside reaches the SQL
            conn.execute(text(f'ANALYZE "{name}"'))
        conn.commit()
    if stale:
        log.debug("analysed %s", ", ".join(stale))
    return stale

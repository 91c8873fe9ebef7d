"""Apply the numbered SQL files in sql/ in order, each once.

Safe when several replicas start at once: a transaction-scoped advisory lock serialises
runners, and each file is applied and recorded in one transaction, so a crash leaves a
file either fully applied and recorded or not at all. Re-running applies nothing new.
A file whose content changed after it was applied is reported, never re-applied.

The bookkeeping table (outbox.schema_migrations) is defined by sql/0000_pre_bookkeeping.sql
alone: that file's statements run at the start of every file's transaction, right after
the lock, and the file is then applied and recorded as version 0000 (a no-op by then). A
database migrated before 0000 existed records 0001 and later; 0000 is applied to it once,
changing nothing but its record. Applying the files with `psql -f` in order builds the same
schema but records nothing (tests/test_psql_apply.py).

Migrations are append-only and backward compatible: a new file never changes or removes
what an earlier release of the relay or an application uses (a removal waits for a later
``_post_`` file, once nothing uses it). So a relay runs on any schema at or above its own
latest migration, and /readyz accepts one (relay/service/health.py): during a rolling upgrade the
new release migrates first and the old relays keep serving.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

__all__ = [
    "BOOTSTRAP_FILE",
    "Migration",
    "MigrationError",
    "applied_versions",
    "discover",
    "migrate",
    "sql_dir",
]

# Any fixed 64-bit number; it only has to be the same in every replica.
_ADVISORY_LOCK_KEY = 0x6F7574626F78  # "outbox"
_FILE_PATTERN = re.compile(r"^(\d{4})_(pre|post)_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    code = "migration_failed"


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def sql_dir() -> Path:
    """The migrations: packaged inside the wheel, or the repository's sql/ when editable."""
    package = Path(__file__).resolve().parent.parent  # relay/
    packaged = package / "_sql"
    if packaged.is_dir():
        return packaged
    return package.parent / "sql"


def discover(directory: Path | None = None) -> list[Migration]:
    directory = directory or sql_dir()
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_PATTERN.match(path.name)
        if match is None:
            continue
        found.append(Migration(version=match.group(1), name=path.stem, path=path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a number in {directory}: {versions}")
    return found


# The bookkeeping table's one definition. It runs before every file (whatever `directory`
# a caller passes), since the versions are read and recorded in each file's transaction;
# discovered as migration 0000 it is then also applied and recorded like any other file:
# a no-op, every statement being IF NOT EXISTS.
BOOTSTRAP_FILE = "0000_pre_bookkeeping.sql"


def _bootstrap_sql() -> str:
    return (sql_dir() / BOOTSTRAP_FILE).read_text()


def applied_versions(conn: psycopg.Connection) -> dict[str, str]:
    exists = conn.execute("SELECT to_regclass('outbox.schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute("SELECT version, checksum FROM outbox.schema_migrations").fetchall()
    return {version: checksum for version, checksum in rows}


def _up_to_date(conn: psycopg.Connection, migrations: list[Migration]) -> bool:
    try:
        done = applied_versions(conn)
    except psycopg.errors.InsufficientPrivilege:
        return False
    return all(done.get(m.version) == m.checksum for m in migrations)


def migrate(
    conninfo: str,
    *,
    directory: Path | None = None,
    report: Callable[[str], None] = lambda _line: None,
) -> list[str]:
    """Apply pending migrations; return the names applied (empty when up to date)."""
    migrations = discover(directory)
    bootstrap = _bootstrap_sql()
    applied: list[str] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        # Up to date: nothing to lock or create, so a role without CREATE (the relay's
        # least-privilege role running `run --migrate`) starts instead of failing.
        if _up_to_date(conn, migrations):
            return applied
        for migration in migrations:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ADVISORY_LOCK_KEY,))
                conn.execute(bootstrap)  # type: ignore[arg-type]
                done = applied_versions(conn)
                if migration.version in done:
                    if done[migration.version] != migration.checksum:
                        report(
                            f"warning: {migration.name}.sql changed after it was applied; "
                            "migrations are append-only, add a new numbered file instead"
                        )
                    continue
                try:
                    conn.execute(migration.path.read_text())  # type: ignore[arg-type]
                except psycopg.Error as exc:
                    raise MigrationError(f"{migration.name}.sql failed: {exc}") from exc
                conn.execute(
                    "INSERT INTO outbox.schema_migrations (version, name, checksum) "
                    "VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
                applied.append(migration.name)
                report(f"applied {migration.name}")
    return applied

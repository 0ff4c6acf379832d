"""The release hook of the migration example: applies the schema migrations this release
needs to the SQLite database at $DATABASE, each once, recorded in `schema_migrations`.

Expand/contract: this release only *expands* (adds a nullable column), so the release still
running on the other hosts keeps working while the rollout moves on. Dropping what no release
reads any more (the *contract* step) is a migration of a later release, once every host has
left the old one.

Every run is recorded in `hook_runs` (host, release), which shows that fleet ran it once
per rollout, not once per host.
"""

import os
import sqlite3

MIGRATIONS = [
    ("0002_users_email", "ALTER TABLE users ADD COLUMN email TEXT"),
]


def main():
    database = os.environ.get("DATABASE")
    if not database:
        raise SystemExit(
            "migrate.py: DATABASE is not set; create the release with --env DATABASE=PATH"
        )
    con = sqlite3.connect(database, timeout=30, isolation_level=None)
    con.execute("BEGIN IMMEDIATE")
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version TEXT PRIMARY KEY, release TEXT)"
    )
    con.execute("CREATE TABLE IF NOT EXISTS hook_runs (host TEXT, release TEXT)")
    release = os.environ.get("FLEET_VERSION", "")
    con.execute(
        "INSERT INTO hook_runs VALUES (?, ?)", (os.environ.get("FLEET_HOST", ""), release)
    )
    done = {row[0] for row in con.execute("SELECT version FROM schema_migrations")}
    for version, sql in MIGRATIONS:
        if version in done:
            continue
        con.execute(sql)
        con.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, release))
        print(f"migrate.py: applied {version}")
    con.execute("COMMIT")


if __name__ == "__main__":
    main()

"""Alembic environment: run by ``db.store.migrate`` with its connection in ``config.attributes["connection"]``.

Without one (autogenerating a revision), it opens the database of ``PEFTLAB_DB_URL`` / the PEFT Lab home, or the
``sqlalchemy.url`` option, with ``db.store.new_engine`` (the engine ``get_engine`` makes, without migrating it).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from db import config as lab_config
from db.schema import Base


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters most things by copying the table
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    url = context.config.get_main_option("sqlalchemy.url") or lab_config.db_url()
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
    elif context.is_offline_mode():
        context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
    else:
        from db.store import new_engine

        engine = new_engine(url)
        try:
            with engine.connect() as conn:
                run_migrations(conn)
                conn.commit()
        finally:
            engine.dispose()


main()

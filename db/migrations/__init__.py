"""The database schema's history, as alembic revisions (``versions/``), applied by ``db.store.migrate``.

Configured in code (``db.store.alembic_config``), no alembic.ini. To add a revision after changing
``db/schema.py``, write one on a database at the current head and review what autogenerate wrote::

    from alembic import command
    from db.store import alembic_config
    command.revision(alembic_config(), message="what changed", autogenerate=True)

Name the new file ``versions/NNNN_what.py`` with ``revision = "NNNN"``; never edit a revision that has shipped.
"""

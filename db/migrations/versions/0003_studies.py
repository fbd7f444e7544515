"""Studies: a ``studies`` table, and each run's study, trial parameters and Ray node.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("n_trials", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_studies_status", "studies", ["status"])
    op.create_index("ix_studies_created_at", "studies", ["created_at"])
    # Plain nullable columns: SQLite adds them with ALTER TABLE ADD COLUMN, without copying the runs table. A run's
    # study is an indexed id rather than a foreign key, for the same reason.
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("study_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("trial_params", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("node_id", sa.String(length=64), nullable=True))
    op.create_index("ix_runs_study_id", "runs", ["study_id"])


def downgrade() -> None:
    op.drop_index("ix_runs_study_id", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("node_id")
        batch.drop_column("trial_params")
        batch.drop_column("study_id")
    op.drop_index("ix_studies_created_at", table_name="studies")
    op.drop_index("ix_studies_status", table_name="studies")
    op.drop_table("studies")

"""Index payments by the PSP's payment id: refund and dispute webhooks look payments up by it

Revision ID: 0004_psp_payment_index
Revises: 0003_psp_routing
Create Date: 2026-11-26 11:20:00

"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004_psp_payment_index"
down_revision: str | Sequence[str] | None = "0003_psp_routing"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_payments_psp_payment", "payments", ["psp", "psp_payment_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_payments_psp_payment", table_name="payments")

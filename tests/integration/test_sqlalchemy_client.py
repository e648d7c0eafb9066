"""The API side on SQLAlchemy: a Starlette app whose endpoint inserts an order and enqueues
its workflow in one session transaction; `enqueue` inside `engine.begin()`; the public
tables read with the API's own session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import UUID

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from flowforge_orchestrator import client, store
from flowforge_orchestrator.client import enqueue, redrive, send_event, tables
from flowforge_orchestrator.core.definition.parse import parse_definition_text
from flowforge_orchestrator.errors import ConfigError, NotFound, RedriveError

GREET = "name: greet\nversion: 1\nsteps:\n  - {id: hello, type: transform, output: hi}\n"

orders = sa.Table(
    "orders",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("item", sa.Text, nullable=False),
)


class Refused(Exception):
    """The endpoint's own failure after both writes: its transaction rolls back."""


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    conn = await store.connect(db_url)
    try:
        await store.register_definition(conn, parse_definition_text(GREET))
        await conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, item text NOT NULL)")
    finally:
        await conn.close()
    sa_engine = create_async_engine(db_url.replace("postgresql://", "postgresql+asyncpg://", 1))
    yield sa_engine
    await sa_engine.dispose()


def _app(engine: AsyncEngine) -> Starlette:
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def create_order(request: Request) -> JSONResponse:
        body = await request.json()
        try:
            async with sessions() as session, session.begin():
                insert = sa.insert(orders).values(item=body["item"]).returning(orders.c.id)
                order_id = (await session.execute(insert)).scalar_one()
                run = await enqueue(
                    session, "greet", {"order_id": order_id}, idempotency_key=f"order-{order_id}"
                )
                if body.get("refuse"):
                    raise Refused(f"order {order_id} refused")
        except Refused as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        return JSONResponse({"order": order_id, "run": str(run.id)}, status_code=201)

    return Starlette(routes=[Route("/orders", create_order, methods=["POST"])])


async def _counts(engine: AsyncEngine) -> tuple[int, int]:
    async with engine.connect() as conn:
        order_count = (await conn.execute(sa.select(sa.func.count()).select_from(orders))).scalar()
        runs = sa.select(sa.func.count()).select_from(tables.runs)
        run_count = (await conn.execute(runs)).scalar()
    return int(order_count or 0), int(run_count or 0)


async def test_an_endpoint_inserts_an_order_and_starts_its_run_in_one_transaction(
    engine: AsyncEngine,
) -> None:
    transport = httpx.ASGITransport(app=_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as http:
        created = await http.post("/orders", json={"item": "book"})
        refused = await http.post("/orders", json={"item": "lamp", "refuse": True})

    assert created.status_code == 201 and refused.status_code == 409
    assert await _counts(engine) == (1, 1)  # the refused order left neither row
    async with async_sessionmaker(engine)() as session:
        row = (
            await session.execute(
                sa.select(
                    tables.runs.c.status, tables.runs.c.input, tables.runs.c.idempotency_key
                ).where(tables.runs.c.id == UUID(created.json()["run"]))
            )
        ).one()
    order = created.json()["order"]
    assert (row.status, row.input, row.idempotency_key) == (
        "pending",
        {"order_id": order},
        f"order-{order}",
    )


async def test_enqueue_on_an_async_connection_commits_and_rolls_back_with_it(
    engine: AsyncEngine,
) -> None:
    # The first statement of the transaction is the engine's own: BEGIN must precede it.
    with pytest.raises(Refused):
        async with engine.begin() as conn:
            await enqueue(conn, "greet", {"n": 1})
            raise Refused("rolled back")
    assert await _counts(engine) == (0, 0)

    async with engine.begin() as conn:
        run = await enqueue(conn, "greet", {"n": 2}, idempotency_key="two")
        again = await enqueue(conn, "greet", {"n": 2}, idempotency_key="two")
    assert (run.created, again.created, again.id) == (True, False, run.id)
    assert await _counts(engine) == (0, 1)


async def test_events_and_redrive_take_a_session_and_report_like_the_asyncpg_path(
    engine: AsyncEngine,
) -> None:
    sessions = async_sessionmaker(engine)
    async with sessions() as session, session.begin():
        run = await enqueue(session, "greet")
        event_id = await send_event(session, "paid", {"amount": 42}, key="order-7")
    async with sessions() as session:
        stored = (
            await session.execute(
                sa.select(tables.events.c.name, tables.events.c.key, tables.events.c.payload).where(
                    tables.events.c.id == event_id
                )
            )
        ).one()
        assert tuple(stored) == ("paid", "order-7", {"amount": 42})
        with pytest.raises(RedriveError, match="is pending"):
            await redrive(session, run.id)
        await session.rollback()
        missing = UUID(int=7)
        with pytest.raises(NotFound):
            await redrive(session, missing)


async def test_the_public_tables_match_the_migrated_schema(engine: AsyncEngine) -> None:
    query = sa.text(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'flowforge' AND table_name = :name ORDER BY ordinal_position"
    )
    async with engine.connect() as conn:
        for table in (tables.runs, tables.events, tables.outbox_cloudevents, tables.step_attempts):
            found = {
                row.column_name: row.data_type
                for row in await conn.execute(query, {"name": table.name})
            }
            mine = {column.name for column in table.columns}
            assert mine <= set(found), (table.name, mine - set(found))
            if table.name in ("runs", "events", "step_attempts"):
                assert mine == set(found), (table.name, set(found) - mine)
            rows = (await conn.execute(sa.select(table).limit(1))).all()  # readable as declared
            assert rows == []
    assert client.tables is tables


async def test_a_connection_of_another_kind_is_refused_with_what_is_accepted() -> None:
    with pytest.raises(ConfigError, match="AsyncSession or AsyncConnection, not str"):
        await enqueue("postgresql://nowhere", "greet")

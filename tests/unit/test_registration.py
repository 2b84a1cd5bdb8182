"""Mistakes in registering tasks and callbacks are refused at `@app.task` time."""

from __future__ import annotations

import functools
from typing import Any

import pytest

import pgbatch
from pgbatch import RegistrationError


def test_a_plain_function_is_refused_as_a_task_and_as_a_callback() -> None:
    app = pgbatch.App()

    def handler(items: Any, ctx: Any) -> list[Any]:
        return []

    with pytest.raises(RegistrationError, match=r"task 'handler'.*must be an async function"):
        app.task()(handler)  # type: ignore[arg-type]
    with pytest.raises(RegistrationError, match=r"callback 'handler'.*async"):
        app.callback()(handler)  # type: ignore[arg-type]
    assert app.tasks == {} and app.callbacks == {}


def test_a_name_registered_twice_is_refused_and_the_first_handler_stays() -> None:
    app = pgbatch.App()

    @app.task("embed")
    async def first(items: Any, ctx: Any) -> list[Any]:
        return []

    with pytest.raises(RegistrationError, match=r"task 'embed' is already registered"):

        @app.task("embed")
        async def second(items: Any, ctx: Any) -> list[Any]:
            return []

    assert app.tasks["embed"].fn is first

    @app.callback()
    async def done(batch: Any, ctx: Any) -> None:
        return None

    with pytest.raises(RegistrationError, match=r"callback 'done' is already registered"):
        app.callback("done")(done)


def test_async_callables_that_are_not_plain_coroutine_functions_are_accepted() -> None:
    app = pgbatch.App()

    async def handler(items: Any, ctx: Any, *, scale: int) -> list[Any]:
        return []

    class Handler:
        async def __call__(self, items: Any, ctx: Any) -> list[Any]:
            return []

    app.task("partial")(functools.partial(handler, scale=2))
    app.task("instance")(Handler())
    assert set(app.tasks) == {"partial", "instance"}


def test_the_same_name_on_two_apps_is_fine() -> None:
    async def handler(items: Any, ctx: Any) -> list[Any]:
        return []

    for app in (pgbatch.App(), pgbatch.App()):
        app.task("same")(handler)


@pytest.mark.parametrize("name", ["a\x00b", "lone \ud800", "x" * 201])
def test_a_name_postgresql_or_the_api_cannot_take_is_refused(name: str) -> None:
    # Attack on issue 12 §4. Seen failing: a task named "a\x00b" registered, and its worker
    # then logged "claiming one shard at a time failed: PostgreSQL text fields cannot
    # contain NUL" at every claim, forever.
    app = pgbatch.App()

    async def handler(items: Any, ctx: Any) -> list[Any]:
        return []

    with pytest.raises(RegistrationError, match=r"task .*: a name has 1 to 200 characters"):
        app.task(name)(handler)
    with pytest.raises(RegistrationError, match=r"callback .*: a name has 1 to 200 characters"):
        app.callback(name)(handler)
    assert app.tasks == {} and app.callbacks == {}


@pytest.mark.parametrize("queue", ["q\x00", "lone \ud800", "q" * 201])
def test_a_queue_no_claim_can_name_is_refused_at_registration(queue: str) -> None:
    # Attack on issue 12 §2/§4: as a NUL task name, a NUL queue failed every claim.
    app = pgbatch.App()

    async def handler(items: Any, ctx: Any) -> list[Any]:
        return []

    with pytest.raises(pgbatch.InvalidBatchError, match=r"a queue name has 1 to 200"):
        app.task("t", queue=queue)(handler)
    assert app.tasks == {}

"""Bearer tokens per tenant: 401s, tenants that never see each other's batches, and a
server that refuses to expose an unauthenticated API beyond loopback."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from pgbatch.api.auth import TokenTable, new_token
from pgbatch.api.server import check_bind
from pgbatch.errors import ConfigurationError
from tests.api.conftest import RunningApi, StartApi
from tests.api.support import assert_error
from tests.helpers import run_cli

TENANTS = ("acme", "globex")


def _requests(batch_id: int) -> list[tuple[str, str, dict[str, Any]]]:
    """Every authenticated operation on one batch: (method, path, httpx keyword arguments)."""
    url = f"/v1/batches/{batch_id}"
    return [
        ("GET", url, {}),
        ("PATCH", url, {"json": {"priority": 1}, "headers": {"If-Match": "*"}}),
        ("POST", f"{url}/retry", {}),
        ("GET", f"{url}/results", {}),
        ("GET", f"{url}/results", {"headers": {"Accept": "text/csv"}}),
        ("GET", f"{url}/insight", {}),
        ("GET", f"{url}/events", {}),
    ]


async def _submit(client: httpx.AsyncClient, items: list[Any], **kwargs: Any) -> httpx.Response:
    return await client.post("/v1/batches", json={"task": "echo", "items": items}, **kwargs)


@pytest.mark.asyncio
async def test_requests_without_a_valid_token_are_401(start_api: StartApi) -> None:
    async with start_api(tenants=TENANTS) as running, running.client() as anonymous:
        created = await _submit(anonymous, [1])
        assert_error(created, 401, code="unauthenticated", field="Authorization")
        assert created.headers["www-authenticate"] == "Bearer"
        async with running.client("acme") as acme:
            batch_id = (await _submit(acme, [1])).json()["id"]
        requests = [("GET", "/v1/batches", {}), ("GET", "/v1/events", {}), *_requests(batch_id)]
        for authorization in (None, "Bearer", "Bearer nope", "Basic YWNtZTpzZWNyZXQ=", "garbage"):
            headers = {} if authorization is None else {"Authorization": authorization}
            for method, path, kwargs in requests:
                kwargs = {**kwargs, "headers": {**kwargs.get("headers", {}), **headers}}
                response = await anonymous.request(method, path, **kwargs)
                error = assert_error(response, 401, field="Authorization")
                assert response.headers["www-authenticate"].startswith("Bearer"), response.headers
                if authorization == "Bearer nope":
                    assert error["code"] == "invalid_token"
        # Another tenant's token with the right shape is still only that tenant's.
        token, _ = new_token("acme")
        response = await anonymous.get("/v1/batches", headers={"Authorization": f"Bearer {token}"})
        assert_error(response, 401, code="invalid_token")
        # The query-string token is for event streams (EventSource) only.
        response = await anonymous.get(f"/v1/batches?access_token={running.tokens['acme']}")
        assert_error(response, 401, code="unauthenticated")
        # Health and metrics stay open to probes and scrapers.
        assert (await anonymous.get("/healthz")).status_code == 200
        assert (await anonymous.get("/metrics")).status_code == 200


@pytest.mark.asyncio
async def test_a_tenant_sees_only_its_own_batches(start_api: StartApi) -> None:
    async with (
        start_api(tenants=TENANTS) as running,
        running.client("acme") as acme,
        running.client("globex") as globex,
    ):
        acme_ids = [(await _submit(acme, [n])).json()["id"] for n in range(3)]
        globex_id = (await _submit(globex, ["g"])).json()["id"]
        for batch_id in [*acme_ids, globex_id]:
            await running.app.wait(batch_id, timeout_s=30)
        for method, path, kwargs in _requests(acme_ids[0]):
            response = await globex.request(method, path, **kwargs)
            assert_error(response, 404, code="batch_not_found")
        listed = (await globex.get("/v1/batches")).json()["batches"]
        assert [b["id"] for b in listed] == [globex_id]
        listed = (await acme.get("/v1/batches", params={"limit": 2})).json()
        cursor = listed["next_cursor"]
        rest = (await acme.get("/v1/batches", params={"cursor": cursor})).json()["batches"]
        assert [b["id"] for b in listed["batches"] + rest] == sorted(acme_ids, reverse=True)
        # The owner can do all of it (nothing above changed the batch).
        for method, path, kwargs in _requests(acme_ids[0]):
            if path.endswith("/events"):
                async with acme.stream(method, path, **kwargs) as response:
                    assert response.status_code == 200
                continue
            response = await acme.request(method, path, **kwargs)
            assert response.status_code == 200, (method, path, response.text)
        assert (await acme.get(f"/v1/batches/{acme_ids[0]}")).json()["priority"] == 1


@pytest.mark.asyncio
async def test_an_idempotency_key_belongs_to_its_tenant(start_api: StartApi) -> None:
    async with (
        start_api(tenants=TENANTS, worker=False) as running,
        running.client("acme") as acme,
        running.client("globex") as globex,
    ):
        key = {"Idempotency-Key": "order-42"}
        first_acme = await _submit(acme, [1, 2], headers=key)
        first_globex = await _submit(globex, [1, 2], headers=key)
        assert (first_acme.status_code, first_globex.status_code) == (201, 201)
        assert first_acme.json()["id"] != first_globex.json()["id"]
        again_acme = await _submit(acme, [1, 2], headers=key)
        again_globex = await _submit(globex, [1, 2], headers=key)
        assert (again_acme.status_code, again_globex.status_code) == (200, 200)
        assert again_acme.json()["id"] == first_acme.json()["id"]
        assert again_globex.json()["id"] == first_globex.json()["id"]
        # A different payload conflicts within a tenant only.
        assert_error(await _submit(globex, [3], headers=key), 409, field="Idempotency-Key")
        assert (await _submit(acme, [3], headers={"Idempotency-Key": "other"})).status_code == 201


def test_an_unauthenticated_server_binds_to_loopback_only() -> None:
    no_tokens = TokenTable.parse(None)
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com", "", "127.0.0.1.nip.io"):
        with pytest.raises(ConfigurationError, match="refusing to listen"):
            check_bind(host, no_tokens)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_bind(host, no_tokens)
    _, entry = new_token("acme")
    check_bind("0.0.0.0", TokenTable.parse(entry))


@pytest.mark.asyncio
async def test_serve_refuses_a_public_host_without_tokens_and_says_why(
    database_url: str,
) -> None:
    public = await run_cli(
        "serve", "--host", "0.0.0.0", "--port", "0",
        database_url=database_url, env={"PGBATCH_API_TOKENS": ""}, timeout_s=60,
    )  # fmt: skip
    assert public.code == 2, public.output
    assert "refusing to listen on 0.0.0.0" in public.output
    assert "PGBATCH_API_TOKENS" in public.output
    assert "Traceback" not in public.output
    bad_tokens = await run_cli(
        "serve", "--port", "0",
        database_url=database_url, env={"PGBATCH_API_TOKENS": "acme:md5:abc"}, timeout_s=60,
    )  # fmt: skip
    assert bad_tokens.code == 2, bad_tokens.output
    assert "PGBATCH_API_TOKENS" in bad_tokens.output
    assert "Traceback" not in bad_tokens.output


@pytest.mark.asyncio
async def test_without_tokens_every_request_is_the_default_tenant(api: RunningApi) -> None:
    async with api.client() as client:
        created = await _submit(client, [1], headers={"Authorization": "Bearer anything"})
        assert created.status_code == 201
        listed = await client.get("/v1/batches")
        assert [b["id"] for b in listed.json()["batches"]] == [created.json()["id"]]

"""The stand-in API server behaves like kube-apiserver where the driver can tell."""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any

import pytest

from tests.fakeapi import ADMIN, FakeKubeAPI, Fault


class Client:
    def __init__(self, api: FakeKubeAPI, token: str | None) -> None:
        context = ssl.create_default_context(cafile=str(api.ca_file))
        self._conn = http.client.HTTPSConnection(
            "127.0.0.1", int(api.url.rsplit(":", 1)[1]), context=context, timeout=10
        )
        self._token = token

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        self._conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = self._conn.getresponse()
        return response.status, json.loads(response.read() or b"null")

    def watch(self, path: str) -> http.client.HTTPResponse:
        self._conn.request("GET", path, headers={"Authorization": f"Bearer {self._token}"})
        return self._conn.getresponse()


SECRETS = "/api/v1/namespaces/ns1/secrets"


@pytest.fixture
def admin(api: FakeKubeAPI) -> Client:
    return Client(api, api.add_user(ADMIN))


def secret(name: str, rv: str | None = None, **data: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if rv:
        meta["resourceVersion"] = rv
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": data}


def test_failures_are_status_objects_with_code_reason_and_message(
    api: FakeKubeAPI, admin: Client
) -> None:
    code, body = admin.call("GET", f"{SECRETS}/nope")

    assert code == 404
    assert body["kind"] == "Status" and body["status"] == "Failure"
    assert (body["code"], body["reason"]) == (404, "NotFound")
    assert body["message"] == 'secrets "nope" not found'


def test_no_token_is_401_and_an_ungranted_user_is_403(api: FakeKubeAPI) -> None:
    stranger = Client(api, api.add_user("system:serviceaccount:ns1:app"))

    code, body = Client(api, None).call("GET", f"{SECRETS}/x")
    assert (code, body["reason"]) == (401, "Unauthorized")
    code, body = stranger.call("GET", f"{SECRETS}/x")
    assert (code, body["reason"]) == (403, "Forbidden")
    assert body["message"] == (
        'secrets "x" is forbidden: User "system:serviceaccount:ns1:app" '
        'cannot get resource "secrets" in API group "" in the namespace '
        '"ns1"'
    )


def test_a_grant_for_one_name_allows_only_that_name(api: FakeKubeAPI, admin: Client) -> None:
    admin.call("POST", SECRETS, secret("one", k="eA=="))
    admin.call("POST", SECRETS, secret("two", k="eA=="))
    api.grant("alice", "ns1", "get", "one")
    alice = Client(api, api.add_user("alice"))

    assert alice.call("GET", f"{SECRETS}/one")[0] == 200
    assert alice.call("GET", f"{SECRETS}/two")[0] == 403


def test_every_write_bumps_the_resource_version_and_stale_updates_conflict(admin: Client) -> None:
    code, created = admin.call("POST", SECRETS, secret("rv-test", k="eA=="))
    assert code == 201
    rv = created["metadata"]["resourceVersion"]

    code, updated = admin.call("PUT", f"{SECRETS}/rv-test", secret("rv-test", rv, k="eQ=="))
    assert code == 200 and int(updated["metadata"]["resourceVersion"]) > int(rv)

    code, body = admin.call("PUT", f"{SECRETS}/rv-test", secret("rv-test", rv, k="eg=="))
    assert (code, body["reason"]) == (409, "Conflict")
    code, body = admin.call("POST", SECRETS, secret("rv-test", k="eA=="))
    assert (code, body["reason"]) == (409, "AlreadyExists")


def test_invalid_objects_are_rejected(admin: Client) -> None:
    assert admin.call("POST", SECRETS, secret("Bad_Name"))[0] == 422
    assert admin.call("POST", SECRETS, secret("ok", **{"a/b": "eA=="}))[0] == 422
    assert admin.call("POST", SECRETS, secret("ok2", k="not base64!"))[0] == 400


def test_a_watch_streams_changes_after_the_given_version(admin: Client, api: FakeKubeAPI) -> None:
    _, listed = admin.call("GET", SECRETS)
    since = listed["metadata"]["resourceVersion"]
    stream = Client(api, admin._token).watch(
        f"{SECRETS}?watch=true&resourceVersion={since}&timeoutSeconds=2"
    )
    admin.call("POST", SECRETS, secret("watched", k="eA=="))
    admin.call("DELETE", f"{SECRETS}/watched")

    events = [json.loads(line) for line in stream.read().splitlines() if line]

    mine = [e for e in events if e["object"]["metadata"]["name"] == "watched"]
    assert [e["type"] for e in mine] == ["ADDED", "DELETED"]
    assert int(mine[0]["object"]["metadata"]["resourceVersion"]) > int(since)


def test_a_watch_from_a_compacted_version_gets_410_expired(admin: Client, api: FakeKubeAPI) -> None:
    _, listed = admin.call("GET", SECRETS)
    old = listed["metadata"]["resourceVersion"]
    admin.call("POST", SECRETS, secret("compacted", k="eA=="))
    api.store.compact()

    stream = Client(api, admin._token).watch(f"{SECRETS}?watch=true&resourceVersion={old}")
    events = [json.loads(line) for line in stream.read().splitlines() if line]

    assert events[0]["type"] == "ERROR"
    assert (events[0]["object"]["code"], events[0]["object"]["reason"]) == (410, "Expired")


def test_injected_faults_hit_only_matching_requests_for_their_count(
    api: FakeKubeAPI, admin: Client
) -> None:
    admin.call("POST", SECRETS, secret("faulty", k="eA=="))
    api.inject(Fault(status=503, times=2, path="/faulty"))

    codes = [admin.call("GET", f"{SECRETS}/faulty")[0] for _ in range(3)]

    assert codes == [503, 503, 200]

"""SecretReader against the stand-in API server over real HTTPS."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import grpc
import pytest

from secretfs.csi.kube import FetchError, SecretReader, connect, decode_secret
from secretfs.fs.buffer import SecretBuffer, live_bytes
from tests.conftest import DRIVER_USER
from tests.fakeapi import FakeKubeAPI, Fault


@pytest.fixture
def reader(api: FakeKubeAPI, driver_token: str, tmp_path: Path) -> SecretReader:
    return SecretReader(
        *connect(str(api.write_kubeconfig(tmp_path / "kc", driver_token))), budget=1.0
    )


def fetch_code(reader: SecretReader, namespace: str, name: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(FetchError) as failure:
        reader.read(namespace, name)
    return failure.value.code, str(failure.value)


def test_values_arrive_byte_exact_in_locked_buffers(reader: SecretReader, api: FakeKubeAPI) -> None:
    values = {"bin": bytes(range(256)), "empty": b"", "text": "héllo".encode()}
    api.set_secret("default", "exact", values)

    buffers = reader.read("default", "exact")

    assert {k: bytes(b.view()) for k, b in buffers.items()} == values
    assert all(b.locked for b in buffers.values() if len(b))


@pytest.mark.parametrize(
    ("namespace", "name", "code", "words"),
    [
        ("default", "absent", grpc.StatusCode.NOT_FOUND, 'secrets "absent" not found'),
        ("locked", "db", grpc.StatusCode.PERMISSION_DENIED, f'User "{DRIVER_USER}" cannot get'),
    ],
)
def test_refusals_map_to_their_code_and_carry_the_api_message(
    reader: SecretReader,
    api: FakeKubeAPI,
    namespace: str,
    name: str,
    code: grpc.StatusCode,
    words: str,
) -> None:
    api.set_secret("locked", "db", {"k": b"v"})

    got, message = fetch_code(reader, namespace, name)

    assert got == code
    assert f"secret {namespace}/{name}" in message and words in message


def test_an_unknown_token_is_unauthenticated(api: FakeKubeAPI, tmp_path: Path) -> None:
    reader = SecretReader(*connect(str(api.write_kubeconfig(tmp_path / "kc", "not-a-token"))))

    assert fetch_code(reader, "default", "db")[0] == grpc.StatusCode.UNAUTHENTICATED


def test_server_errors_are_retried_until_the_budget_is_spent(
    reader: SecretReader, api: FakeKubeAPI
) -> None:
    api.inject(Fault(status=500, times=10_000, path="/secrets/flaky"))
    before = api.count("GET", "/secrets/flaky")
    start = time.monotonic()

    code, message = fetch_code(reader, "default", "flaky")

    elapsed = time.monotonic() - start
    assert code == grpc.StatusCode.UNAVAILABLE and "unavailable after" in message
    assert api.count("GET", "/secrets/flaky") - before >= 3
    assert 0.5 < elapsed < 2.0


def test_429_and_dropped_connections_are_transient(reader: SecretReader, api: FakeKubeAPI) -> None:
    api.set_secret("default", "bumpy", {"k": b"v"})
    api.inject(Fault(status=429, path="/secrets/bumpy"))
    api.inject(Fault(drop=True, path="/secrets/bumpy"))

    assert bytes(reader.read("default", "bumpy")["k"].view()) == b"v"


def test_a_slow_api_counts_against_the_budget(reader: SecretReader, api: FakeKubeAPI) -> None:
    api.inject(Fault(delay=3.0, path="/secrets/slow"))
    start = time.monotonic()

    assert fetch_code(reader, "default", "slow")[0] == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 2.5


def test_the_connection_is_kept_alive_between_reads(reader: SecretReader, api: FakeKubeAPI) -> None:
    api.set_secret("default", "db", {"k": b"v"})
    reader.read("default", "db")
    before = api.connections

    for _ in range(5):
        reader.read("default", "db")

    assert api.connections == before


def test_a_key_that_cannot_be_a_file_name_is_failed_precondition(
    reader: SecretReader, api: FakeKubeAPI
) -> None:
    api.store.put("default", "odd", {"..": "eA=="}, create=True)

    assert fetch_code(reader, "default", "odd")[0] == grpc.StatusCode.FAILED_PRECONDITION


def test_a_value_that_is_not_base64_is_internal(reader: SecretReader, api: FakeKubeAPI) -> None:
    api.store.put("default", "garbled", {"k": "***"}, create=True)

    assert fetch_code(reader, "default", "garbled")[0] == grpc.StatusCode.INTERNAL


def test_a_chunked_body_of_a_large_secret_arrives_whole(
    reader: SecretReader, api: FakeKubeAPI
) -> None:
    values = {f"k{i}": bytes([i]) * 5000 for i in range(40)}  # a body of ~270 KB, chunked
    api.set_secret("default", "large", values)

    buffers = reader.read("default", "large")

    assert {k: bytes(b.view()) for k, b in buffers.items()} == values


def test_a_connection_with_bytes_beyond_the_response_is_never_reused(
    reader: SecretReader, api: FakeKubeAPI
) -> None:
    api.set_secret("default", "db", {"k": b"v"})
    reader.read("default", "db")
    before = api.connections
    api.inject(
        Fault(trailing=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", path="/secrets/db")
    )

    reader.read("default", "db")  # answered, then followed by a smuggled extra response
    reader.read("default", "db")

    assert api.connections == before + 1  # the tainted connection was dropped
    assert bytes(reader.read("default", "db")["k"].view()) == b"v"


def test_a_read_is_on_the_wire_before_its_result_is_asked_for(
    reader: SecretReader, api: FakeKubeAPI
) -> None:
    api.set_secret("default", "db", {"k": b"v"})
    path = "/namespaces/default/secrets/db"
    before = api.count("GET", path)

    with reader.start("default", "db") as pending:
        deadline = time.monotonic() + 5
        while api.count("GET", path) == before:
            assert time.monotonic() < deadline, "the request was not sent"
            time.sleep(0.01)
        buffers = pending.result()

    assert bytes(buffers["k"].view()) == b"v"
    assert api.count("GET", path) == before + 1


def test_a_dropped_read_wipes_its_request_and_never_reuses_its_connection(
    reader: SecretReader, api: FakeKubeAPI
) -> None:
    api.set_secret("default", "db", {"k": b"v"})
    reader.read("default", "db")
    connections, held = api.connections, live_bytes()

    with reader.start("default", "db"):
        assert live_bytes() > held  # the request, token and all, is in a buffer
    dropped = live_bytes()
    buffers = reader.read("default", "db")

    assert dropped == held
    assert api.connections == connections + 1  # its answer may still be on the way
    assert bytes(buffers["k"].view()) == b"v"


@pytest.mark.parametrize("value", [b"Bearer a\r\nX-Evil: 1", b"Bearer a\x00b", b"Bearer \x7f"])
def test_an_authorization_value_with_a_control_character_is_never_sent(
    reader: SecretReader, api: FakeKubeAPI, value: bytes
) -> None:
    api.set_secret("default", "db", {"k": b"v"})
    before = api.count("GET", "/secrets/db")

    with pytest.raises(ValueError, match="control characters"):
        reader.read("default", "db", SecretBuffer.from_bytes(value))

    assert api.count("GET", "/secrets/db") == before


def test_broken_chunked_framing_is_transient_and_never_quotes_the_body(
    reader: SecretReader, api: FakeKubeAPI, caplog: pytest.LogCaptureFixture
) -> None:
    value = b"framing-marker-0123456789"
    api.set_secret("default", "misframed", {"k": value})
    api.inject(Fault(misframed=True, times=100, path="/secrets/misframed"))

    code, message = fetch_code(reader, "default", "misframed")

    assert code == grpc.StatusCode.UNAVAILABLE and "malformed chunked" in message
    encoded = base64.b64encode(value).decode()
    assert encoded not in message and encoded not in caplog.text


@pytest.mark.parametrize(
    "body", [b'["c2VjcmV0"]', b'{"kind": "Status", "data": {}}', b"[" * 100_000 + b"]" * 100_000]
)
def test_an_answer_that_is_not_a_secret_object_is_internal(body: bytes) -> None:
    with pytest.raises(FetchError) as failure:
        decode_secret(memoryview(body), "secret default/odd")

    assert failure.value.code == grpc.StatusCode.INTERNAL

"""Which files a volume shows: all of the Secret's keys, or the items asked for."""

from __future__ import annotations

import grpc
import pytest

from secretfs.csi.errors import CsiError
from secretfs.csi.node import select_files
from secretfs.csi.validation import Item, PublishSpec
from secretfs.fs.buffer import SecretBuffer


def spec(items: tuple[Item, ...] | None, optional: bool = False) -> PublishSpec:
    return PublishSpec("v", "/t", "ns", "db", items=items, optional=optional)


def secret() -> dict[str, SecretBuffer]:
    return {k: SecretBuffer.from_bytes(v) for k, v in {"a": b"1", "b": b"22", "c": b""}.items()}


def contents(files: dict[str, SecretBuffer]) -> dict[str, bytes]:
    return {path: bytes(buffer.view()) for path, buffer in files.items()}


def test_without_items_every_key_is_a_file() -> None:
    assert contents(select_files(secret(), spec(None))) == {"a": b"1", "b": b"22", "c": b""}


def test_items_choose_keys_and_paths_and_the_rest_is_wiped() -> None:
    buffers = secret()

    files = select_files(buffers, spec((Item("b", "dir/sub/b.txt"), Item("a", "a"))))

    assert contents(files) == {"dir/sub/b.txt": b"22", "a": b"1"}
    assert buffers["c"].wiped and not buffers["a"].wiped


def test_a_key_listed_twice_gets_a_buffer_of_its_own_for_each_path() -> None:
    files = select_files(secret(), spec((Item("a", "x"), Item("a", "y"))))

    assert contents(files) == {"x": b"1", "y": b"1"}
    assert files["x"] is not files["y"]


def test_a_listed_key_missing_from_the_secret_is_not_found_naming_the_key() -> None:
    buffers = secret()

    with pytest.raises(CsiError) as failure:
        select_files(buffers, spec((Item("a", "a"), Item("zz", "z"))))

    assert failure.value.code == grpc.StatusCode.NOT_FOUND
    assert "no key zz" in failure.value.message
    assert all(buffer.wiped for buffer in buffers.values())


def test_an_optional_volume_skips_missing_keys() -> None:
    files = select_files(secret(), spec((Item("a", "a"), Item("zz", "z")), optional=True))

    assert contents(files) == {"a": b"1"}


def test_items_repeating_a_key_past_the_volume_cap_are_refused_and_wiped() -> None:
    buffers = {"big": SecretBuffer.from_bytes(b"x" * (512 * 1024))}
    items = tuple(Item("big", f"copy-{i}") for i in range(5))  # 2.5 MiB of copies

    with pytest.raises(CsiError) as failure:
        select_files(buffers, spec(items))

    assert failure.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert buffers["big"].wiped

"""FrozenMap: a read-only, hashable, picklable mapping for frozen attrs fields."""

from __future__ import annotations

import pickle

import pytest

from kernel import FrozenMap


def test_a_frozen_map_reads_like_a_dict_and_cannot_be_changed() -> None:
    source = {"a": 1, "b": 2}
    frozen = FrozenMap(source)
    source["c"] = 3  # a copy: the caller's dict changing later changes nothing
    assert dict(frozen) == {"a": 1, "b": 2} and len(frozen) == 2 and frozen["a"] == 1
    with pytest.raises(TypeError):
        frozen["a"] = 5  # type: ignore[index]
    with pytest.raises(KeyError):
        frozen["c"]


def test_equal_maps_hash_alike_and_survive_pickle() -> None:
    one, two = FrozenMap({"a": 1, "b": 2}), FrozenMap({"b": 2, "a": 1})
    assert one == two and hash(one) == hash(two)
    assert one == {"a": 1, "b": 2}
    assert pickle.loads(pickle.dumps(one)) == one

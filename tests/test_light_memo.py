"""light.QueryMemo: the front's validated queries by request bytes stay within their bounds."""

from __future__ import annotations

from kinship_service.server.light import Prepared, QueryMemo


def test_entries_and_bytes_are_bounded_least_recently_used_first() -> None:
    memo = QueryMemo(max_entries=3, max_bytes=64 * 100)
    for i in range(4):
        memo.put("ShouldStop", bytes([i]) * 10, Prepared(i, True))
    assert memo.get("ShouldStop", bytes([0]) * 10) is None  # the oldest went first
    kept = memo.get("ShouldStop", bytes([1]) * 10)
    assert kept is not None and kept.query == 1
    memo.put("ShouldStop", bytes([9]) * 10, Prepared(9, False))  # 2 is now the least recently used
    assert memo.get("ShouldStop", bytes([2]) * 10) is None
    assert memo.get("ShouldStop", bytes([1]) * 10) is not None


def test_methods_are_kept_apart_and_big_requests_are_not_kept() -> None:
    memo = QueryMemo(max_entries=100, max_bytes=6400)
    memo.put("Kinship", b"same", Prepared("kinship", True))
    assert memo.get("ShouldStop", b"same") is None
    memo.put("Kinship", b"x" * 101, Prepared("big", True))  # over max_bytes / 64
    assert memo.get("Kinship", b"x" * 101) is None
    for i in range(70):  # 70 x 99 bytes > 6400: the oldest are dropped to stay under the byte bound
        memo.put("ShouldStop", i.to_bytes(2, "big") * 49 + b"!", Prepared(i, True))
    kept = [i for i in range(70) if memo.get("ShouldStop", i.to_bytes(2, "big") * 49 + b"!") is not None]
    assert kept == list(range(70 - len(kept), 70)) and len(kept) * 99 <= 6400

"""Near-duplicate images within a batch: an index of perceptual hashes that finds an earlier
image within a few bits without comparing against every image."""

from __future__ import annotations

from server.quality import hamming


class DuplicateIndex:
    """Finds an earlier image whose perceptual hash is within `max_distance` bits: two hashes
    that close agree exactly on at least one of `max_distance + 1` disjoint bit bands
    (pigeonhole), so only band-mates are compared."""

    def __init__(self, max_distance: int = 4) -> None:
        if max_distance < 0:
            raise ValueError(f"max_distance must be >= 0, got {max_distance}")
        self.max_distance = max_distance
        self._bands: dict[tuple[int, int, int], list[tuple[int, str, str]]] = {}
        self._count = 0

    def _keys(self, phash: str) -> list[tuple[int, int, int]]:
        bits = len(phash) * 4
        value = int(phash, 16)
        bands = self.max_distance + 1
        keys = []
        for b in range(bands):
            start, end = b * bits // bands, (b + 1) * bits // bands
            keys.append((bits, b, (value >> start) & ((1 << (end - start)) - 1)))
        return keys

    def find(self, phash: str) -> str | None:
        """The earliest added image within `max_distance` bits of `phash`, or None."""
        if not _is_hex(phash):
            return None
        best: tuple[int, str] | None = None
        for key in self._keys(phash):
            for order, other, ref in self._bands.get(key, ()):
                if (best is None or order < best[0]) and hamming(phash, other) <= (
                    self.max_distance
                ):
                    best = (order, ref)
        return None if best is None else best[1]

    def add(self, phash: str, ref: str) -> None:
        if not _is_hex(phash):
            return
        self._count += 1
        for key in self._keys(phash):
            self._bands.setdefault(key, []).append((self._count, phash, ref))


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdefABCDEF" for c in text)

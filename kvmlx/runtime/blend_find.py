"""Finding published documents anywhere in a prompt, by token ids (not by separator strings).

Each stored document is cut into blocks of `block` tokens at its own aligned offsets (0, 16, 32, ...),
and each block's token ids are hashed. The prompt is hashed at *every* offset (a window of `block`
tokens sliding by one), so a document is found wherever it starts, whatever precedes it. A window
whose hash names a document block is checked token by token, then the match is extended token by
token backwards and forwards as far as prompt and document agree: any run of 2·block - 1 equal tokens
contains one whole aligned block and is found.

A document whose first or last tokens merged with the surrounding text (a BPE token spanning the
boundary: "doc" + "\\n" tokenizes differently in context) still matches on its interior: the
extension stops at the first differing token, and the prompt tokens outside the match, the merged
edges included, are computed like any other prompt token. Matches shorter than `min_tokens` are
ignored; overlapping matches are resolved left to right, longest first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

BLOCK = 16
MIN_TOKENS = 32


@dataclass(frozen=True)
class Span:
    """`prompt[start:end] == document[doc_start:doc_end]` for the stored document `key`."""

    key: str
    start: int
    end: int
    doc_start: int
    doc_end: int
    doc_tokens: int  # the document's whole length

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def delta(self) -> int:
        """How far its keys move: new position minus stored position."""
        return self.start - self.doc_start

    def to_json(self) -> dict:
        return {"key": self.key, "start": self.start, "end": self.end, "doc_start": self.doc_start,
                "doc_end": self.doc_end, "doc_tokens": self.doc_tokens}


class DocumentIndex:
    """Block hashes of stored documents: {hash of `block` token ids: [(key, aligned offset)]}."""

    def __init__(self, documents: Mapping[str, Sequence[int]], block: int = BLOCK):
        if block < 1:
            raise ValueError("block must be positive")
        self.block = block
        self.documents = {k: list(map(int, v)) for k, v in documents.items()}
        self.blocks: dict[int, list[tuple[str, int]]] = {}
        for key, tokens in self.documents.items():
            for j in range(0, len(tokens) - block + 1, block):
                self.blocks.setdefault(hash(tuple(tokens[j : j + block])), []).append((key, j))

    def find(self, prompt: Sequence[int], *, min_tokens: int = MIN_TOKENS, limit: int | None = None) -> list[Span]:
        """Non-overlapping matches of stored documents in `prompt[:limit]`, left to right."""
        tokens = list(map(int, prompt))
        n = len(tokens) if limit is None else min(limit, len(tokens))
        b = self.block
        spans: list[Span] = []
        floor = 0  # the end of the previous match: a new one may not reach back before it
        i = 0
        while i + b <= n:
            best: Span | None = None
            for key, j in self.blocks.get(hash(tuple(tokens[i : i + b])), ()):
                doc = self.documents[key]
                if doc[j : j + b] != tokens[i : i + b]:
                    continue  # a hash collision
                s, d = i, j
                while s > floor and d > 0 and tokens[s - 1] == doc[d - 1]:
                    s, d = s - 1, d - 1
                e, f = i + b, j + b
                while e < n and f < len(doc) and tokens[e] == doc[f]:
                    e, f = e + 1, f + 1
                span = Span(key, s, e, d, f, len(doc))
                if best is None or span.length > best.length:
                    best = span
            if best is not None and best.length >= min_tokens:
                spans.append(best)
                floor = i = best.end
            else:
                i += 1
        return spans

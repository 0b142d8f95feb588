"""The built-in byte-level tokenizer: UTF-8 bytes as tokens 0-255, then a few specials.

It needs no files, so a user can fine-tune a model without a tokenizer directory and tests run
without a model hub. Any model whose vocabulary holds at least `ByteTokenizer.vocab_size`
entries accepts it. Ids past 258 are never produced.
"""

from __future__ import annotations

from dataclasses import dataclass

NUM_BYTES = 256


@dataclass(frozen=True, kw_only=True, slots=True)
class ByteTokenizer:
    """UTF-8 bytes plus beginning-of-sequence, end-of-sequence and padding tokens."""

    bos_token_id: int = NUM_BYTES
    eos_token_id: int = NUM_BYTES + 1
    pad_token_id: int = NUM_BYTES + 2

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids this tokenizer can produce."""
        return NUM_BYTES + 3

    @property
    def name(self) -> str:
        return "byte"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without specials."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; specials are dropped, invalid UTF-8 is replaced."""
        return bytes(i for i in ids if i < NUM_BYTES).decode("utf-8", errors="replace")

"""Training data: JSON Lines in, packed fixed-length token blocks out, resumable.

Each line is a JSON object with either
  {"text": "..."}                          loss on every token, or
  {"prompt": "...", "response": "..."}     loss on the response tokens only (labels -100 on
                                           the prompt).
An example becomes [bos] + tokens + [eos]; examples are concatenated in a seeded, per-epoch
shuffled order and cut into blocks of the plan's sequence length (the last block of an epoch is
padded, with labels -100 on the padding). Labels are unshifted, as HF causal-LM losses expect.

Known limitations: packed examples attend to the examples before them in the same block (no
block-diagonal mask), as in most packing trainers; an example longer than a block is split
across blocks.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from planner.errors import ChunkftError
from runtime.tokenizer import ByteTokenizer

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index, used by HF losses


class TextTokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def name(self) -> str: ...
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class HFTokenizer:
    """A local Hugging Face tokenizer directory behind the `TextTokenizer` protocol."""

    tokenizer: object
    path: str

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)  # includes added tokens, unlike tokenizer.vocab_size

    @property
    def name(self) -> str:
        return self.path

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def load_tokenizer(path: str | os.PathLike | None, *, model_vocab_size: int) -> TextTokenizer:
    """The tokenizer at `path` (a local HF tokenizer directory), or the built-in byte tokenizer
    when `path` is None or "byte". A tokenizer that can produce ids outside the model's
    embedding (vocabulary larger than `model_vocab_size`) is refused."""
    if path is None or str(path) == "byte":
        tok: TextTokenizer = ByteTokenizer()
    else:
        if not Path(path).is_dir():
            raise ChunkftError(f"tokenizer {str(path)!r} is not a directory; give a local Hugging Face "
                               f"tokenizer directory or 'byte' for the built-in byte-level tokenizer")
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ChunkftError(f"cannot load tokenizer from {str(path)!r}: {first}") from None
        tok = HFTokenizer(tokenizer=hf, path=str(path))
    if tok.vocab_size > model_vocab_size:
        raise ChunkftError(f"tokenizer {tok.name!r} has {tok.vocab_size} tokens but the model's vocab_size is "
                           f"{model_vocab_size}: its ids would index past the embedding; use the model's own "
                           f"tokenizer")
    return tok


def padding_id(tok: TextTokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its eos token, else 0 (padding
    carries no loss, so any in-vocabulary id will do)."""
    for candidate in (tok.pad_token_id, tok.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


@dataclass(frozen=True, kw_only=True, slots=True)
class Example:
    """One tokenized example: input ids and unshifted labels (IGNORE_INDEX = no loss)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def _example_from_row(row: object, tok: TextTokenizer, where: str) -> Example:
    if not isinstance(row, dict):
        raise ChunkftError(f"{where} is not a JSON object; expected {{\"text\": ...}} or "
                           f"{{\"prompt\": ..., \"response\": ...}}")
    has_text = "text" in row
    has_pair = "prompt" in row or "response" in row
    if has_text and has_pair:
        raise ChunkftError(f"{where} has both \"text\" and \"prompt\"/\"response\"; use one form per line")
    keys = ("text",) if has_text else ("prompt", "response")
    for key in keys:
        if key not in row:
            found = ", ".join(sorted(map(str, row))) or "none"
            raise ChunkftError(f"{where} is missing key {key!r} (found keys: {found}); expected "
                               f"{{\"text\": ...}} or {{\"prompt\": ..., \"response\": ...}}")
        if not isinstance(row[key], str):
            raise ChunkftError(f"{where}: {key!r} must be a string, not {type(row[key]).__name__}")
    head = [tok.bos_token_id] if tok.bos_token_id is not None else []
    tail = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if has_text:
        body = tok.encode(row["text"])
        ids = head + body + tail
        labels = [IGNORE_INDEX] * len(head) + body + tail
    else:
        prompt, response = tok.encode(row["prompt"]), tok.encode(row["response"])
        ids = head + prompt + response + tail
        labels = [IGNORE_INDEX] * (len(head) + len(prompt)) + response + tail
    return Example(input_ids=tuple(ids), labels=tuple(labels))


def read_examples(path: str | os.PathLike, tok: TextTokenizer) -> list[Example]:
    """Tokenize every line of the JSON Lines file at `path`. Blank lines are skipped; a bad line
    (not JSON, not an object, missing keys, wrong types) is a ChunkftError naming file and line."""
    examples: list[Example] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"data file {str(path)!r} line {lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ChunkftError(f"{where} is not valid JSON ({e.msg})") from None
                except RecursionError:
                    raise ChunkftError(f"{where} nests JSON too deeply; valid lines are flat objects "
                                       f'such as {{"text": ...}} or {{"prompt": ..., "response": ...}}') from None
                examples.append(_example_from_row(row, tok, where))
    except FileNotFoundError:
        raise ChunkftError(f"data file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ChunkftError(f"cannot read data file {str(path)!r}: {e}") from None
    if not any(label != IGNORE_INDEX for ex in examples for label in ex.labels):
        raise ChunkftError(f"data file {str(path)!r} has no tokens to train on (no lines, or only empty responses)")
    return examples


@dataclass(frozen=True, kw_only=True, slots=True)
class DataPosition:
    """Where the loader is: the epoch and the next block within it. Saved in checkpoints."""

    epoch: int = 0
    block: int = 0

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "block": self.block}

    @classmethod
    def from_json(cls, d: dict) -> "DataPosition":
        return cls(epoch=int(d["epoch"]), block=int(d["block"]))


def pack(examples: list[Example], seq_len: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate `examples` and cut into blocks of `seq_len`: (input_ids, labels), each
    [num_blocks, seq_len] int64; the last block is padded (labels IGNORE_INDEX)."""
    total = sum(len(ex.input_ids) for ex in examples)
    num_blocks = max(1, math.ceil(total / seq_len))
    ids = torch.full((num_blocks * seq_len,), pad_token_id, dtype=torch.int64)
    labels = torch.full((num_blocks * seq_len,), IGNORE_INDEX, dtype=torch.int64)
    pos = 0
    for ex in examples:  # one tensor per example, no Python list of every token in the epoch
        n = len(ex.input_ids)
        ids[pos:pos + n] = torch.tensor(ex.input_ids, dtype=torch.int64)
        labels[pos:pos + n] = torch.tensor(ex.labels, dtype=torch.int64)
        pos += n
    return ids.view(num_blocks, seq_len), labels.view(num_blocks, seq_len)


class PackedLoader:
    """Batches of packed blocks, reshuffled every epoch from `seed`; resumable by position.

    Epoch e uses the example order random.Random(seed * 1_000_003 + e).shuffle, so the data a
    step sees depends only on (seed, position), never on what ran before in the process.
    """

    def __init__(self, examples: list[Example], *, seq_len: int, batch_size: int, seed: int,
                 pad_token_id: int, shuffle: bool = True) -> None:
        assert examples and seq_len > 0 and batch_size > 0
        self.examples = examples
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.shuffle = shuffle
        self.position = DataPosition()
        self._epoch_cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def epoch_blocks(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All blocks of `epoch`, in order."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = list(range(len(self.examples)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            ids, labels = pack([self.examples[i] for i in order], self.seq_len, self.pad_token_id)
            self._epoch_cache = (epoch, ids, labels)
        return self._epoch_cache[1], self._epoch_cache[2]

    @property
    def blocks_per_epoch(self) -> int:
        return self.epoch_blocks(0)[0].shape[0]  # the token count, hence the block count, is fixed

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `batch_size` blocks ([batch, seq_len] input ids and labels); a batch that
        runs past the end of an epoch continues into the next one."""
        rows_ids, rows_labels = [], []
        epoch, block = self.position.epoch, self.position.block
        for _ in range(self.batch_size):
            ids, labels = self.epoch_blocks(epoch)
            if block >= ids.shape[0]:
                epoch, block = epoch + 1, 0
                ids, labels = self.epoch_blocks(epoch)
            rows_ids.append(ids[block])
            rows_labels.append(labels[block])
            block += 1
        self.position = DataPosition(epoch=epoch, block=block)
        return torch.stack(rows_ids), torch.stack(rows_labels)


def eval_batches(examples: list[Example], *, seq_len: int, batch_size: int,
                 pad_token_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation set packed in file order and split into batches (the last may be short)."""
    ids, labels = pack(examples, seq_len, pad_token_id)
    return [(ids[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, ids.shape[0], batch_size)]

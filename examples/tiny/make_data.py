"""Regenerate examples/tiny/train.jsonl and eval.jsonl from Python's own documentation.

The text is the prose of `pydoc_data.topics` (the help() pages of the Python language
reference that ship with every CPython): paragraphs of 120-900 characters, wrapped lines
joined, code blocks and headings left out. Topics in sorted order; every eighth paragraph
goes to eval.jsonl, the rest to train.jsonl, up to the counts below. Nothing is downloaded.
The committed files were made with CPython 3.11; another version's documentation differs.

    python examples/tiny/make_data.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pydoc_data.topics

HERE = Path(__file__).resolve().parent
TRAIN_LINES, EVAL_LINES = 320, 40


def paragraphs() -> list[str]:
    out = []
    for name in sorted(pydoc_data.topics.topics):
        for block in re.split(r"\n\s*\n", pydoc_data.topics.topics[name]):
            lines = block.split("\n")
            if any(line.startswith(" ") or set(line.strip()) <= set("*=-^") for line in lines):
                continue  # code, grammar, tables and headings
            text = " ".join(line.strip() for line in lines)
            if 120 <= len(text) <= 900 and text.isascii():
                out.append(text)
    return out


def main() -> None:
    train, evals = [], []
    for i, text in enumerate(paragraphs()):
        (evals if i % 8 == 7 else train).append(text)
    for name, rows, n in (("train.jsonl", train, TRAIN_LINES), ("eval.jsonl", evals, EVAL_LINES)):
        if len(rows) < n:
            raise SystemExit(f"only {len(rows)} paragraphs for {name}, wanted {n}")
        with open(HERE / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in rows[:n])
        print(f"wrote {HERE / name}: {n} lines")


if __name__ == "__main__":
    main()

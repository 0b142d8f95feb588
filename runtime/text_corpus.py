"""Real text without a download: a pretraining domain and a held-apart fine-tuning domain.

Both come from what every Python installation carries:
  - prose: the English of Python's own reference documentation, `pydoc_data.topics.topics`
    (the help() topics, ~0.46 M characters), topics in sorted order;
  - code: `.py` files of the standard library (`sysconfig.get_paths()['stdlib']`), read from
    fixed, sorted module lists so the corpus is the same on every run of the same Python.

`PRETRAIN_MODULES` are general-purpose top-level modules (argument parsing, ASTs, data classes,
enums, text wrapping ...); `FINETUNE_PACKAGES` are the concurrency packages (asyncio,
concurrent.futures, multiprocessing), whose idioms -- event loops, futures, async/await, locks,
process pools -- the pretraining code does not use. Their modules are split by position in the
sorted list: every `EVAL_EVERY`-th module (offset `EVAL_OFFSET`) is held out for evaluation and
never trained on.

`train_bpe` trains a byte-level BPE tokenizer (HF `tokenizers`) on the pretraining text only,
as a base model's tokenizer would be: the fine-tuning domain's identifiers are split into the
pieces that text taught it. `blocks` tokenizes a list of documents, joins them with an
end-of-text token and cuts the stream into `seq_len`-token `runtime.data.Example`s (the last
partial block is dropped), so a shuffled loader shuffles whole blocks.

Known limitations: the stdlib differs between Python versions (3.11 here); the corpus records
its character counts so a run on another version shows it read different text.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

from planner.errors import ChunkftError
from runtime.data import Example

PRETRAIN_MODULES = (
    "argparse", "ast", "base64", "calendar", "configparser", "contextlib", "copy", "csv", "dataclasses", "difflib",
    "enum", "fractions", "functools", "glob", "heapq", "ipaddress", "numbers", "operator", "pathlib", "pprint",
    "random", "shlex", "statistics", "string", "textwrap", "tokenize", "traceback", "uuid", "warnings", "weakref",
)
"""Top-level stdlib modules of the pretraining domain (~1.07 M characters on Python 3.11)."""
FINETUNE_PACKAGES = ("asyncio", "concurrent", "multiprocessing")
"""Stdlib packages of the fine-tuning domain (~0.83 M characters on Python 3.11)."""
EVAL_EVERY = 5
EVAL_OFFSET = 3
EOT = "<|endoftext|>"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def prose_documents() -> list[str]:
    """The pydoc help topics, in sorted order of their names."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def module_documents(names: tuple[str, ...]) -> list[str]:
    """The source of each top-level stdlib module in `names`, in the order given."""
    root = stdlib_dir()
    out = []
    for name in names:
        path = root / f"{name}.py"
        if not path.is_file():
            raise ChunkftError(f"stdlib module {name!r} not found at {path}")
        out.append(path.read_text(encoding="utf-8"))
    return out


def package_modules(packages: tuple[str, ...]) -> list[str]:
    """Every .py file under the stdlib packages `packages`, relative paths, sorted."""
    root = stdlib_dir()
    paths = sorted(str(p.relative_to(root)) for pkg in packages for p in (root / pkg).rglob("*.py"))
    if not paths:
        raise ChunkftError(f"no .py files under {', '.join(packages)} in {root}")
    return paths


@dataclass(frozen=True, slots=True)
class Domains:
    pretrain: list[str]
    """Prose documents, then the pretraining modules' sources."""
    finetune_train: list[str]
    finetune_eval: list[str]
    train_modules: tuple[str, ...]
    eval_modules: tuple[str, ...]
    prose_chars: int
    code_chars: int


def domains(*, pretrain_modules: tuple[str, ...] = PRETRAIN_MODULES,
            finetune_packages: tuple[str, ...] = FINETUNE_PACKAGES, max_prose_chars: int | None = None) -> Domains:
    """Read both domains; the fine-tuning modules split into train and held-out eval modules."""
    prose = prose_documents()
    if max_prose_chars is not None:
        kept, total = [], 0
        for doc in prose:
            if total >= max_prose_chars:
                break
            kept.append(doc[:max_prose_chars - total])
            total += len(kept[-1])
        prose = kept
    code = module_documents(pretrain_modules)
    modules = package_modules(finetune_packages)
    eval_modules = tuple(m for i, m in enumerate(modules) if i % EVAL_EVERY == EVAL_OFFSET)
    train_modules = tuple(m for m in modules if m not in eval_modules)
    root = stdlib_dir()
    read = lambda ms: [(root / m).read_text(encoding="utf-8") for m in ms]  # noqa: E731
    return Domains(prose + code, read(train_modules), read(eval_modules), train_modules, eval_modules,
                   sum(map(len, prose)), sum(map(len, code)))


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (HF `tokenizers`) trained on `texts`; EOT is token 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.token_to_id(EOT) != 0:
        raise ChunkftError("the BPE tokenizer did not give the end-of-text token id 0")
    return tok


def token_stream(tok, texts: list[str]) -> list[int]:
    """Every document's tokens, each followed by the end-of-text token."""
    out: list[int] = []
    for enc in tok.encode_batch(texts):
        out += enc.ids
        out.append(0)
    return out


def blocks(ids: list[int], seq_len: int, max_blocks: int | None = None) -> list[Example]:
    """`ids` cut into whole `seq_len`-token examples (labels = inputs), at most `max_blocks`."""
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n < 1:
        raise ChunkftError(f"{len(ids)} tokens make no block of {seq_len}")
    out = []
    for i in range(n):
        block = tuple(ids[i * seq_len:(i + 1) * seq_len])
        out.append(Example(input_ids=block, labels=block))
    return out

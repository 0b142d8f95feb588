"""Data pipeline: JSONL parsing, label masking, errors by line, packing, resumable shuffling."""

from __future__ import annotations

import json

import pytest
import torch

from planner.errors import ChunkftError
from runtime.data import (IGNORE_INDEX, DataPosition, PackedLoader, eval_batches, load_tokenizer, pack,
                          read_examples)
from runtime.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_byte_tokenizer_round_trip():
    ids = TOK.encode("héllo")
    assert ids == list("héllo".encode("utf-8")) and len(ids) == 6
    assert TOK.decode([TOK.bos_token_id] + ids + [TOK.eos_token_id]) == "héllo"
    assert TOK.vocab_size == 259


def test_text_and_prompt_response_labels(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "ab"}), "",
                                              json.dumps({"prompt": "Q", "response": "A!"})])
    text, pair = read_examples(path, TOK)
    assert text.input_ids == (256, 97, 98, 257)
    assert text.labels == (IGNORE_INDEX, 97, 98, 257)
    assert pair.input_ids == (256, 81, 65, 33, 257)
    # loss only on the response (and the eos that ends it)
    assert pair.labels == (IGNORE_INDEX, IGNORE_INDEX, 65, 33, 257)


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2 is not valid JSON"),
    ("[1, 2]", "line 2 is not a JSON object"),
    ('{"prompt": "x"}', "line 2 is missing key 'response'"),
    ('{"txt": "x"}', "line 2 is missing key 'prompt' (found keys: txt)"),
    ('{"text": 3}', "line 2: 'text' must be a string, not int"),
    ('{"prompt": "a", "response": null}', "line 2: 'response' must be a string, not NoneType"),
    ('{"text": "a", "prompt": "b", "response": "c"}', "line 2 has both"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"text": "fine"}), line])
    with pytest.raises(ChunkftError) as err:
        read_examples(path, TOK)
    assert message in str(err.value) and "bad.jsonl" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ChunkftError, match="does not exist"):
        read_examples(tmp_path / "nope.jsonl", TOK)
    with pytest.raises(ChunkftError, match="no tokens to train on"):
        read_examples(write_lines(tmp_path / "empty.jsonl", [""]), TOK)
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ChunkftError, match="cannot read data file"):
        read_examples(tmp_path / "binary.jsonl", TOK)


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path):
    assert load_tokenizer(None, model_vocab_size=259).vocab_size == 259
    with pytest.raises(ChunkftError, match="has 259 tokens but the model's vocab_size is 128"):
        load_tokenizer("byte", model_vocab_size=128)
    with pytest.raises(ChunkftError, match="is not a directory"):
        load_tokenizer(tmp_path / "missing", model_vocab_size=1000)


def test_hf_tokenizer_directory(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    fast.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok", model_vocab_size=5)
    (ex,) = read_examples(write_lines(tmp_path / "d.jsonl", ['{"text": "a b a"}']), tok)
    assert ex.input_ids == (1, 3, 4, 3, 2)
    with pytest.raises(ChunkftError, match="has 5 tokens but the model's vocab_size is 4"):
        load_tokenizer(tmp_path / "tok", model_vocab_size=4)


def test_pack_pads_last_block():
    examples = read_examples_from_texts(["abc", "de"])  # 5 + 4 = 9 tokens
    ids, labels = pack(examples, 4, TOK.pad_token_id)
    assert ids.shape == (3, 4)
    assert ids.flatten().tolist()[:9] == [256, 97, 98, 99, 257, 256, 100, 101, 257]
    assert ids.flatten().tolist()[9:] == [TOK.pad_token_id] * 3
    assert labels.flatten().tolist()[9:] == [IGNORE_INDEX] * 3


def read_examples_from_texts(texts):
    from runtime.data import _example_from_row

    return [_example_from_row({"text": t}, TOK, "test") for t in texts]


def test_loader_is_deterministic_and_resumable():
    examples = read_examples_from_texts([f"example number {i}" for i in range(20)])
    make = lambda: PackedLoader(examples, seq_len=16, batch_size=3, seed=7, pad_token_id=TOK.pad_token_id)
    a = make()
    batches = [a.next_batch() for _ in range(12)]  # runs over several epochs
    assert a.position.epoch >= 1
    # epochs are reshuffled: epoch 0 and epoch 1 differ, and the same seed gives the same order
    assert not torch.equal(a.epoch_blocks(0)[0], a.epoch_blocks(1)[0])
    b = make()
    assert all(torch.equal(x[0], y[0]) for x, y in zip(batches, (b.next_batch() for _ in range(12))))
    # resume from a saved position: the same batches follow
    c = make()
    for _ in range(5):
        c.next_batch()
    saved = DataPosition.from_json(json.loads(json.dumps(c.position.to_json())))
    d = make()
    d.position = saved
    for want in batches[5:]:
        got = d.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_eval_batches_cover_everything_in_order():
    examples = read_examples_from_texts(["x" * 10, "y" * 10])
    batches = eval_batches(examples, seq_len=8, batch_size=2, pad_token_id=TOK.pad_token_id)
    ids = torch.cat([b[0] for b in batches]).flatten().tolist()
    assert [b[0].shape[0] for b in batches] == [2, 1]
    assert ids[:12] == [256] + [120] * 10 + [257]

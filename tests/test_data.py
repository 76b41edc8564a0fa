import json

import numpy as np
import pytest

from minielectra import data
from minielectra.data import (Batches, DataError, DataWarning, build_dataset, load_corpus, pack_sequences,
                              split_documents, split_train_eval, tokenize_corpus, train_or_load_tokenizer)
from minielectra.tokenizer import SPECIAL_TOKENS, WordPieceTokenizer

CLS, SEP, PAD = 2, 3, 0


@pytest.fixture
def tok():
    return WordPieceTokenizer(list(SPECIAL_TOKENS) + ["the", "cat", "sat", "on", "mat", "a", "dog", "##s", "."])


# --- reading ---------------------------------------------------------------------------------------------------------

def test_split_documents_on_blank_lines():
    text = "first line\nstill first\n\nsecond\n   \n\t\n\nthird  \r\n\r\nfourth\n \n"
    assert split_documents(text) == ["first line\nstill first", "second", "third", "fourth"]
    assert split_documents("\n\n  \n") == []
    assert split_documents("one line") == ["one line"]


def test_single_file(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("\ufeffCafé au lait.\n\nSecond doc.\n".encode("utf-8"))  # a BOM is not part of the text
    assert load_corpus(path) == ["Café au lait.", "Second doc."]
    assert load_corpus(str(path)) == ["Café au lait.", "Second doc."]


def test_non_utf8_file_names_file_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("abc caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: byte offset 7 .*must be UTF-8"):
        load_corpus(path)


def test_empty_file_and_missing_path(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n\t\n")
    with pytest.raises(DataError, match="empty"):
        load_corpus(path)
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "nope.txt")


def test_folder_is_recursive_sorted_and_skips_bad_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("b one\n\nb two")
    (tmp_path / "sub" / "a.txt").write_text("sub a")
    (tmp_path / "a.txt").write_text("a one")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    (tmp_path / "blank.txt").write_text("\n")
    (tmp_path / "notes.md").write_text("not a .txt file")
    with pytest.warns(DataWarning) as record:
        docs = load_corpus(tmp_path)
    assert docs == ["a one", "b one", "b two", "sub a"]
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert "bad.txt" in messages[0] and "UTF-8" in messages[0]
    assert "blank.txt" in messages[1] and "empty" in messages[1]


def test_folder_without_usable_files(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff")
    with pytest.warns(DataWarning, match="bad.txt"), pytest.raises(DataError, match="no usable"):
        load_corpus(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no usable .txt file \(0 found\)"):
        load_corpus(tmp_path / "empty")


def test_load_corpus_dispatches_to_builtin(monkeypatch):
    monkeypatch.setattr(data, "builtin_corpus", lambda: ["builtin docs"])
    assert load_corpus(None) == load_corpus("builtin") == ["builtin docs"]


def test_builtin_corpus_is_plenty_of_english():
    docs = load_corpus(None)
    assert len(docs) > 2000
    assert sum(map(len, docs)) > 1_000_000
    assert all(len(d) >= 40 for d in docs)
    words = " ".join(docs[:500]).lower().split()
    assert words.count("the") > 0.02 * len(words)  # English prose, not code
    assert not any(line.lstrip().startswith(">>>") for d in docs for line in d.splitlines())


# --- tokenising and its cache ----------------------------------------------------------------------------------------

def test_tokenize_corpus_and_cache_hit(tok, tmp_path, monkeypatch):
    docs = ["The cat sat.", "", "A dog sat on the mat.", "the cats"]
    ids = tokenize_corpus(docs, tok, cache_dir=tmp_path)
    assert [a.tolist() for a in ids] == tok.encode_many(docs)
    assert all(a.dtype == np.int32 for a in ids)
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 1

    def fail(*args):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(WordPieceTokenizer, "encode_many", fail)
    again = tokenize_corpus(docs, tok, cache_dir=tmp_path)
    assert [a.tolist() for a in again] == [a.tolist() for a in ids]
    # A different corpus or vocabulary is a different key, so it is tokenised (and here fails loudly).
    with pytest.raises(AssertionError, match="tokenised again"):
        tokenize_corpus(docs[:-1] + ["the cat"], tok, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="tokenised again"):
        tokenize_corpus(docs, WordPieceTokenizer(tok.vocab + ["##t"]), cache_dir=tmp_path)


def test_tokenize_corpus_without_cache_writes_nothing(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIELECTRA_CACHE", str(tmp_path / "cache"))
    tokenize_corpus(["the cat"], tok, use_cache=False)
    assert not (tmp_path / "cache").exists()
    tokenize_corpus(["the cat"], tok)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1


def test_unwritable_cache_warns_and_carries_on(tok, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should go")
    with pytest.warns(DataWarning, match="could not write the cache"):
        ids = tokenize_corpus(["the cat"], tok, cache_dir=blocker / "cache")
    assert [a.tolist() for a in ids] == [tok.encode("the cat")]


def test_train_or_load_tokenizer_caches_the_vocab(tmp_path, monkeypatch):
    docs = ["the cat sat on the mat", "the dog sat on the cat"] * 3
    first = train_or_load_tokenizer(docs, 60, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("vocab-*.txt"))) == 1
    monkeypatch.setattr(data, "train_wordpiece", lambda *a: pytest.fail("trained again despite the cache"))
    assert train_or_load_tokenizer(docs, 60, cache_dir=tmp_path).vocab == first.vocab
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        train_or_load_tokenizer(docs, 61, cache_dir=tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("MINIELECTRA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.default_cache_dir() == tmp_path / "minielectra"
    monkeypatch.setenv("MINIELECTRA_CACHE", str(tmp_path / "mine"))
    assert data.default_cache_dir() == tmp_path / "mine"


# --- packing ---------------------------------------------------------------------------------------------------------

def test_pack_sequences_layout():
    docs = [[10, 11, 12], [], [13, 14, 15, 16, 17], np.array([18, 19], dtype=np.int64)]
    ids, mask = pack_sequences(docs, seq_len=6, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.tolist() == [[CLS, 10, 11, 12, 13, SEP],
                            [CLS, 14, 15, 16, 17, SEP],
                            [CLS, 18, 19, SEP, PAD, PAD]]
    assert mask.tolist() == [[1] * 6, [1] * 6, [1, 1, 1, 1, 0, 0]]


@pytest.mark.parametrize("seq_len", [3, 4, 7, 128])
def test_pack_sequences_loses_no_token(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(5, 1000, size=rng.integers(0, 300)) for _ in range(40)]
    ids, mask = pack_sequences(docs, seq_len, CLS, SEP, PAD)
    assert ids.shape == mask.shape == (ids.shape[0], seq_len)
    assert (ids[:, 0] == CLS).all()
    last = mask.sum(axis=1) - 1  # position of each row's [SEP]
    assert (ids[np.arange(len(ids)), last] == SEP).all()
    assert (ids[mask == 0] == PAD).all()
    assert (mask[:-1] == 1).all()  # only the last row may be partial
    inner = mask.astype(bool).copy()
    inner[:, 0] = False
    inner[np.arange(len(ids)), last] = False
    np.testing.assert_array_equal(ids[inner], np.concatenate(docs))


def test_pack_sequences_errors():
    with pytest.raises(ValueError, match="seq_len"):
        pack_sequences([[5, 6]], 2, CLS, SEP, PAD)
    with pytest.raises(DataError, match="no tokens"):
        pack_sequences([[], []], 8, CLS, SEP, PAD)
    with pytest.raises(DataError, match="no tokens"):
        pack_sequences([], 8, CLS, SEP, PAD)


def test_build_dataset(tok, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat.\n\n" * 10)
    ids, mask = build_dataset(corpus, tok, seq_len=16, cache_dir=tmp_path / "cache")
    assert ids.shape == (5, 16) and (ids[:, 0] == tok.cls_id).all()
    assert tok.decode(ids[0]).startswith("[CLS] the cat sat on the mat . the")


# --- splitting and batching ------------------------------------------------------------------------------------------

def rows(n, seq_len=4):
    ids = np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len)
    return ids, np.ones_like(ids)


def test_split_train_eval_is_deterministic_and_complete():
    ids, mask = rows(20)
    (tr, trm), (ev, evm) = split_train_eval(ids, mask, 0.25, seed=3)
    (tr2, _), (ev2, _) = split_train_eval(ids, mask, 0.25, seed=3)
    (tr3, _), _ = split_train_eval(ids, mask, 0.25, seed=4)
    assert len(ev) == 5 and len(tr) == 15 and trm.shape == tr.shape and evm.shape == ev.shape
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(ev, ev2)
    assert not np.array_equal(tr, tr3)
    assert sorted(np.concatenate([tr, ev])[:, 0].tolist()) == ids[:, 0].tolist()
    assert len(split_train_eval(ids, mask, 0.0, seed=0)[1][0]) == 0
    assert len(split_train_eval(ids, mask, 0.001, seed=0)[1][0]) == 1  # a positive fraction gets at least one


def test_split_train_eval_errors():
    ids, mask = rows(1)
    with pytest.raises(DataError, match="1 sequence"):
        split_train_eval(ids, mask, 0.5, seed=0)
    with pytest.raises(ValueError, match="eval_fraction"):
        split_train_eval(*rows(10), 1.0, seed=0)
    with pytest.raises(ValueError, match=r"\(N, seq_len\)"):
        split_train_eval(ids[0], mask[0], 0.5, seed=0)


def test_batches_cover_each_epoch_and_reshuffle():
    ids, mask = rows(10)
    batches = Batches(ids, mask, batch_size=3, rng=np.random.default_rng(0))
    assert batches.batches_per_epoch == 3
    epoch0 = [next(batches) for _ in range(3)]
    assert batches.epoch == 0
    epoch1 = [next(batches)[0] for _ in range(3)]
    assert batches.epoch == 1
    seen0 = np.concatenate([b[0] for b in epoch0])[:, 0]
    assert len(set(seen0.tolist())) == 9  # 9 distinct sequences, the 10th left out this epoch
    assert all(b[0].shape == b[1].shape == (3, 4) for b in epoch0)
    assert not np.array_equal(seen0, np.concatenate(epoch1)[:, 0])
    again = Batches(ids, mask, batch_size=3, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(next(again)[0], epoch0[0][0])


@pytest.mark.parametrize("stop_after", [0, 1, 3, 7])
def test_batches_resume_exactly(stop_after):
    ids, mask = rows(11)
    original = Batches(ids, mask, batch_size=4, rng=np.random.default_rng(7))
    for _ in range(stop_after):
        next(original)
    state = json.loads(json.dumps(original.state_dict()))  # must survive a JSON round trip
    expected = [next(original) for _ in range(6)]
    resumed = Batches(ids, mask, batch_size=4, rng=np.random.default_rng(999))
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    assert resumed.epoch == original.epoch


def test_batches_errors():
    ids, mask = rows(5)
    with pytest.raises(DataError, match="5 sequence.*batch of 8"):
        Batches(ids, mask, batch_size=8, rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        Batches(ids, mask, batch_size=2, rng=0)
    with pytest.raises(ValueError, match="batch_size"):
        Batches(ids, mask, batch_size=0, rng=np.random.default_rng(0))
    state = Batches(ids, mask, batch_size=2, rng=np.random.default_rng(0)).state_dict()
    with pytest.raises(DataError, match="same corpus"):
        Batches(*rows(6), batch_size=2, rng=np.random.default_rng(0)).load_state_dict(state)

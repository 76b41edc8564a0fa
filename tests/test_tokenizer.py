import unicodedata
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minielectra.tokenizer import SPECIAL_TOKENS, WordPieceTokenizer, normalize, pre_tokenize, train_wordpiece

# A hand-made vocab in which greedy longest match has choices to make: "un" vs "una", "##aff" vs "##a" + "##ff".
VOCAB = list(SPECIAL_TOKENS) + ["un", "una", "##aff", "##a", "##ff", "##able", "the", "cat", "##s", ",", ".", "!",
                                "a", "b", "##b", "x"]


@pytest.fixture
def tok():
    return WordPieceTokenizer(VOCAB)


def reference_basic_tokenize(text):
    """Google BERT's BasicTokenizer (do_lower_case=True), char by char as tokenization.py writes it: the oracle.

    One change: lower-casing is per character, as Hugging Face's BertTokenizerFast does it, so a word-final "Σ"
    becomes "σ" (str.lower() would give the final form "ς")."""
    def is_whitespace(c):
        return c in " \t\n\r" or unicodedata.category(c) == "Zs"

    def is_control(c):
        return c not in "\t\n\r" and unicodedata.category(c).startswith("C")

    def is_punct(c):
        cp = ord(c)
        return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
            unicodedata.category(c).startswith("P")

    def is_cjk(cp):
        return any(lo <= cp <= hi for lo, hi in [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                                  (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                                  (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)])

    cleaned = "".join(" " if is_whitespace(c) else c for c in text
                      if not (ord(c) == 0 or ord(c) == 0xFFFD or is_control(c)))
    spaced = "".join(f" {c} " if is_cjk(ord(c)) else c for c in cleaned)
    out = []
    for token in spaced.split():
        token = "".join(c for c in unicodedata.normalize("NFD", token.replace("Σ", "σ").lower()) if unicodedata.category(c) != "Mn")
        word = ""
        for c in token:
            if is_punct(c):
                out += [word, c] if word else [c]
                word = ""
            else:
                word += c
        if word:
            out.append(word)
    return " ".join(out).split()


# --- normalisation ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, words", [
    ("Héllo Wörld", ["hello", "world"]),  # lower-case and strip accents
    ("ÇA VA, ÉLÈVE?", ["ca", "va", ",", "eleve", "?"]),
    ("我爱北京 tokyo", ["我", "爱", "北", "京", "tokyo"]),  # every CJK ideograph is a word
    # Hangul is not in BERT's CJK ranges; NFD splits its syllables into jamo, and BERT leaves them split.
    ("안녕하세요", [unicodedata.normalize("NFD", "안녕하세요")]),
    ("don't stop-me (now)...", ["don", "'", "t", "stop", "-", "me", "(", "now", ")", ".", ".", "."]),
    ("price: $5^2 `x`", ["price", ":", "$", "5", "^", "2", "`", "x", "`"]),  # ASCII symbols count as punctuation
    ("a\x00b\ufffdc\x07d\u200be", ["abcde"]),  # NUL, U+FFFD, controls and format chars are deleted
    ("tab\there\nnew\r\nline\u00a0nbsp", ["tab", "here", "new", "line", "nbsp"]),
    ("MiXeD CaSe", ["mixed", "case"]),
    ("", []),
    ("   \n\t ", []),
])
def test_pre_tokenize_cases(text, words):
    assert pre_tokenize(text) == words
    assert normalize(text) == " ".join(words)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_pre_tokenize_matches_bert_reference(text):
    assert pre_tokenize(text) == reference_basic_tokenize(text)


@pytest.mark.parametrize("text", ["ΟΔΟΣ\x01Β ΟΔΟΣ", "İSTANBUL", "a\x1cb\x85c\u2028d\u2029e", "ﬁ ﬀ ²",
                                  "\uf900\U0002f800x",
                                  "e\u0301\u0327 \u0301", "a\u00adb", "¿qué? «oui» — “no”"])
def test_pre_tokenize_tricky_cases_match_bert_reference(text):
    assert pre_tokenize(text) == reference_basic_tokenize(text)


def test_pre_tokenize_rejects_bytes():
    with pytest.raises(TypeError, match="str"):
        pre_tokenize(b"bytes")


# --- WordPiece -------------------------------------------------------------------------------------------------------

def test_special_ids_and_sizes(tok):
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.special_ids == {0, 1, 2, 3, 4}
    assert tok.vocab_size == len(tok) == len(VOCAB)


@pytest.mark.parametrize("text, tokens", [
    ("unaffable", ["una", "##ff", "##able"]),  # longest first piece wins even if a shorter one would also work
    ("unable", ["[UNK]"]),  # "una" + "##b", then nothing for "le": greedy does not backtrack to "un" + ...
    ("cats, the cat!", ["cat", "##s", ",", "the", "cat", "!"]),
    ("dog", ["[UNK]"]),  # no piece at all
    ("cat dog cat", ["cat", "[UNK]", "cat"]),
    ("catx", ["[UNK]"]),  # "x" is only a word start, not "##x": the whole word is unknown
    ("ab" + "b" * 98, ["a"] + ["##b"] * 99),  # 100 characters is still allowed...
    ("ab" + "b" * 99, ["[UNK]"]),  # ...101 is not (BERT's max_input_chars_per_word)
])
def test_greedy_longest_match(tok, text, tokens):
    assert tok.tokenize(text) == tokens
    assert tok.encode(text) == [VOCAB.index(t) for t in tokens]


def test_encode_many_and_decode(tok):
    assert tok.encode_many(["the cat", "cats."]) == [[VOCAB.index("the"), VOCAB.index("cat")],
                                                     [VOCAB.index("cat"), VOCAB.index("##s"), VOCAB.index(".")]]
    ids = tok.encode("The CATS, unaffable!")
    assert tok.decode(ids) == "the cats , unaffable !"
    assert tok.decode([tok.pad_id] + ids + [tok.pad_id, tok.pad_id]) == "the cats , unaffable !"
    assert tok.decode([tok.cls_id, tok.unk_id, tok.sep_id]) == "[CLS] [UNK] [SEP]"


def test_bad_ids_are_clear_errors(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([len(VOCAB)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="integers"):
        tok.decode([1.5])
    with pytest.raises(TypeError, match="list of texts"):
        tok.encode_many("the cat")


def test_missing_special_tokens_are_named():
    with pytest.raises(ValueError, match=r"\[CLS\] \[MASK\]"):
        WordPieceTokenizer(["[PAD]", "[UNK]", "[SEP]", "the"])


def test_bad_vocabs_are_rejected():
    with pytest.raises(ValueError, match="twice"):
        WordPieceTokenizer(VOCAB + ["the"])
    with pytest.raises(ValueError, match="line"):
        WordPieceTokenizer(VOCAB + ["two\nlines"])
    with pytest.raises(TypeError, match="load"):
        WordPieceTokenizer("vocab.txt")


def test_vocab_txt_round_trip(tok, tmp_path):
    path = tmp_path / "vocab.txt"
    tok.save(path)
    assert path.read_text(encoding="utf-8") == "".join(t + "\n" for t in VOCAB)
    again = WordPieceTokenizer.load(path)
    assert again.vocab == VOCAB
    assert again.encode("unaffable cats") == tok.encode("unaffable cats")


def test_bert_layout_vocab_with_specials_elsewhere(tmp_path):
    # bert-base-uncased: [PAD]=0, [unused0..98], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, then words.
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "##é",
                                                                  "world", "!"]
    path = tmp_path / "vocab.txt"
    path.write_bytes("\r\n".join(vocab).encode("utf-8") + b"\r\n")  # Windows line ends, as some copies have
    tok = WordPieceTokenizer.load(path)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.encode("Hello WORLD!") == [104, 106, 107]
    assert tok.vocab[105] == "##é"  # the vocab itself is not normalised


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no vocab file"):
        WordPieceTokenizer.load(tmp_path / "missing.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("\n".join(SPECIAL_TOKENS).encode() + "\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="UTF-8"):
        WordPieceTokenizer.load(bad)


# --- properties ------------------------------------------------------------------------------------------------------

IN_VOCAB_WORDS = ["the", "cat", "cats", "unaffable", "una", "a", "abbb", ",", ".", "!", "x"]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_text_encodes_to_valid_ids(text):
    tok = WordPieceTokenizer(VOCAB)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert len(ids) == len([p for w in pre_tokenize(text) for p in tok._word_pieces(w)])
    tok.decode(ids)  # never raises


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(IN_VOCAB_WORDS), st.sampled_from([" ", "  ", "\n", "\t", ""]),
                          st.booleans())))
def test_decode_inverts_encode_for_in_vocab_text(parts):
    # Words glued without a space are fine when one of them is punctuation; upper-casing must not matter.
    text = ""
    for word, sep, upper in parts:
        if text and not sep and text[-1].isalpha() and word[0].isalpha():
            sep = " "
        text += sep + (word.upper() if upper else word)
    tok = WordPieceTokenizer(VOCAB)
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == " ".join(pre_tokenize(text)) == normalize(text)


# --- training --------------------------------------------------------------------------------------------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "A quick movie review: the acting was great, the plot was lazy!",
    "Reviews of movies, reviewed by reviewers who review quickly.",
    "Jumping foxes and sleeping dogs; the fox jumped, the dogs slept.",
] * 5 + ["Ünïcödé wörds and 中文 appear once."]


def test_training_layout_and_determinism():
    tok = train_wordpiece(CORPUS, vocab_size=120)
    again = train_wordpiece(list(CORPUS), vocab_size=120)
    assert tok.vocab == again.vocab
    assert tok.vocab[:5] == list(SPECIAL_TOKENS)
    assert tok.vocab_size == 120
    alphabet = sorted({c for text in CORPUS for c in normalize(text).replace(" ", "")})
    assert tok.vocab[5:5 + 2 * len(alphabet)] == alphabet + ["##" + c for c in alphabet]
    assert len(set(tok.vocab)) == tok.vocab_size


def reference_train(texts, vocab_size, min_frequency):
    """The same merges recomputed from scratch each step: slow, but obviously right."""
    counts = Counter(w for t in texts for w in pre_tokenize(t))
    alphabet = sorted({c for w in counts for c in w})
    vocab = list(SPECIAL_TOKENS) + alphabet + ["##" + c for c in alphabet]
    spell = {w: [vocab.index(w[0])] + [vocab.index("##" + c) for c in w[1:]] for w in counts}
    while len(vocab) < vocab_size:
        pairs = Counter()
        for w, ids in spell.items():
            for pair in zip(ids, ids[1:]):
                pairs[pair] += counts[w]
        if not pairs:
            break
        (a, b), c = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if c < min_frequency:
            break
        new = vocab[a] + vocab[b][2:]
        if new not in vocab:
            vocab.append(new)
        n = vocab.index(new)
        for w, ids in spell.items():
            out, i = [], 0
            while i < len(ids):
                if ids[i:i + 2] == [a, b]:
                    out.append(n)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            spell[w] = out
    return vocab


@pytest.mark.parametrize("texts, min_frequency", [(CORPUS, 2), (["aaaa aaa aa abab ba b"] * 3, 1),
                                                  (["abc bca cab abcabc"], 1)])
def test_incremental_training_matches_from_scratch_merges(texts, min_frequency):
    assert train_wordpiece(texts, 300, min_frequency).vocab == reference_train(texts, 300, min_frequency)


def test_trained_vocab_covers_its_corpus():
    tok = train_wordpiece(CORPUS, vocab_size=1000)
    assert tok.vocab_size < 1000  # ran out of pairs seen twice
    for text in CORPUS:
        assert tok.unk_id not in tok.encode(text)
        assert tok.decode(tok.encode(text)) == normalize(text)
    # Frequent words become single tokens; unseen characters are the only source of [UNK].
    for word in ["the", "quick", "dog", "review"]:
        assert tok.tokenize(word) == [word]
    assert tok.tokenize("the θeta") == ["the", "[UNK]"]


def test_training_stops_early_when_no_pair_is_frequent_enough():
    tok = train_wordpiece(["ab ab cd"], vocab_size=1000, min_frequency=2)
    # specials + a b c d + ##a ##b ##c ##d + "ab" (seen twice); "cd" is seen once so it is not merged
    assert tok.vocab[5:] == ["a", "b", "c", "d", "##a", "##b", "##c", "##d", "ab"]
    assert train_wordpiece(["ab ab cd"], vocab_size=1000, min_frequency=1).vocab[-1] == "cd"


def test_training_errors():
    with pytest.raises(ValueError, match="too small"):
        train_wordpiece(CORPUS, vocab_size=10)
    with pytest.raises(ValueError, match="no words"):
        train_wordpiece(["", "  "], vocab_size=100)
    with pytest.raises(TypeError, match="not a single str"):
        train_wordpiece("some text", vocab_size=100)
    with pytest.raises(TypeError, match="int"):
        train_wordpiece(CORPUS, vocab_size=100.0)

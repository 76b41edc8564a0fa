"""WordPiece tokenisation as in BERT (uncased), written out by hand: normalise, split, greedy longest match, train.

Text becomes ids in two stages, as Google's BERT `tokenization.py` does it and with the same ids as Hugging Face's
BertTokenizerFast (uncased), which lower-cases character by character (so a word-final "Σ" becomes "σ", not "ς"):

1. `pre_tokenize` (BERT's BasicTokenizer): clean the text, put spaces around CJK ideographs, lower-case, strip accents,
   then split on whitespace and make every punctuation character a word of its own.
2. `WordPieceTokenizer.tokenize` (BERT's WordpieceTokenizer): cut each word greedily into the longest pieces found in
   the vocabulary; a piece that continues a word is spelled with a `##` prefix ("playing" -> "play", "##ing"). A word
   that cannot be cut into known pieces becomes [UNK] as a whole.

A vocabulary is a list of strings whose index is the id, saved as BERT's vocab.txt (one token per line), so a real
BERT uncased vocab.txt loads unchanged. `train_wordpiece` learns a vocabulary from text the way Hugging Face's
WordPieceTrainer does: start from single characters and repeatedly merge the most frequent adjacent pair of pieces.

Unlike Hugging Face's BertTokenizer we do not protect special tokens written in the text: "[MASK]" typed in a
sentence is the three words "[", "mask", "]", as in Google's original code. Special tokens are added as ids.
"""

import heapq
import os
import unicodedata
from collections import Counter

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONTINUATION = "##"  # prefix of a piece that continues a word rather than starting one
MAX_WORD_CHARS = 100  # BERT's max_input_chars_per_word: longer words become [UNK] without being looked at


# ---------------------------------------------------------------------------------------------------------------------
# Normalisation (BERT's BasicTokenizer)
# ---------------------------------------------------------------------------------------------------------------------

def _is_cjk(cp):
    """BERT's _is_chinese_char: the CJK Unified Ideographs blocks. Hangul and kana are not in it: they are alphabets
    whose words are separated by spaces, while ideographs each stand for a word and get a space either side."""
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


def _is_punctuation(ch):
    """BERT's _is_punctuation. ASCII symbols such as $ ^ ` count too, although Unicode files them as symbols (S*)."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


class _CharMap(dict):
    """A translation table for `str.translate` that computes each character's replacement on first sight.

    Normalising char by char in a Python loop costs about a second per few MB; `str.translate` runs the loop in C and
    only calls back into Python the first time it meets a character, so a corpus costs about one dict lookup per char.
    """

    def __init__(self, rule):
        super().__init__()
        self.rule = rule

    def __missing__(self, cp):
        self[cp] = value = self.rule(chr(cp))
        return value


def _clean_rule(ch):
    """BERT's _clean_text and _tokenize_chinese_chars for one character: None deletes it."""
    if ch in "\t\n\r":
        return " "  # Unicode files these as controls, but BERT treats them as the whitespace they are
    category = unicodedata.category(ch)
    if ch == "\x00" or ch == "\ufffd" or category.startswith("C"):
        return None  # NUL, the replacement character left by bad decoding, and invisible control / format chars
    if category == "Zs" or ch.isspace():
        # BERT keeps line / paragraph separators (Zl, Zp) but its final str.split() splits on them, as on spaces.
        return " "
    if _is_cjk(ord(ch)):
        return f" {ch} "
    return ch


def _accent_punct_rule(ch):
    """BERT's _run_strip_accents and _run_split_on_punc for one character of NFD-decomposed text."""
    if unicodedata.category(ch) == "Mn":
        return None  # a combining accent, split off its letter by NFD ("é" -> "e" + U+0301)
    if _is_punctuation(ch):
        return f" {ch} "
    return ch


_CLEAN = _CharMap(_clean_rule)
_ACCENT_PUNCT = _CharMap(_accent_punct_rule)


def pre_tokenize(text):
    """BERT uncased's BasicTokenizer: the words of `text` after normalisation, punctuation chars as words of their own.

    >>> pre_tokenize("Héllo, WORLD!  北京")
    ['hello', ',', 'world', '!', '北', '京']
    """
    if not isinstance(text, str):
        raise TypeError(f"expected text as str, got {type(text).__name__}")
    # Order matters and follows BERT: clean before lower-casing, lower-case before NFD (lower() can produce combining
    # marks, as "İ" -> "i" + U+0307). Lower-casing is per character, as in Hugging Face's (Rust) BertTokenizerFast
    # that ELECTRA checkpoints are used with: str.lower() alone would make a word-final "Σ" the final form "ς", the
    # one mapping that looks at a character's neighbours, and give other ids than those models saw.
    text = text.translate(_CLEAN).replace("Σ", "σ").lower()
    if not text.isascii():
        text = unicodedata.normalize("NFD", text)
    return text.translate(_ACCENT_PUNCT).split()


def normalize(text):
    """The normalised text: `pre_tokenize(text)` joined with single spaces. decode() returns this for in-vocab text."""
    return " ".join(pre_tokenize(text))


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------------------------

class WordPieceTokenizer:
    """BERT's WordPiece over a vocabulary list (index = id). The five special tokens are found by name, not position."""

    def __init__(self, vocab):
        if isinstance(vocab, str) or not hasattr(vocab, "__iter__"):
            raise TypeError("WordPieceTokenizer(vocab) takes a list of token strings (index = id); "
                            "to read a vocab.txt use WordPieceTokenizer.load(path)")
        self._id_to_token = list(vocab)
        self._token_to_id = {}
        for i, tok in enumerate(self._id_to_token):
            if not isinstance(tok, str) or not tok or "\n" in tok or "\r" in tok:
                raise ValueError(f"vocab entry {i} is {tok!r}: every token must be a non-empty string without line "
                                 "breaks (vocab.txt stores one token per line)")
            if tok in self._token_to_id:
                raise ValueError(f"token {tok!r} appears twice in the vocab (ids {self._token_to_id[tok]} and {i}): "
                                 "each token needs exactly one id")
            self._token_to_id[tok] = i
        missing = [t for t in SPECIAL_TOKENS if t not in self._token_to_id]
        if missing:
            raise ValueError(f"the vocab lacks the special token(s) {' '.join(missing)}: ELECTRA needs all of "
                             f"{' '.join(SPECIAL_TOKENS)}; add them (train_wordpiece puts them at ids 0-4)")
        ids = (self._token_to_id[t] for t in SPECIAL_TOKENS)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = ids
        # No vocabulary piece is longer than this, so the greedy search need not try longer substrings.
        self._max_piece_chars = max(len(t) for t in self._id_to_token)
        self._word_cache = {}  # word -> tuple of ids; a corpus has far fewer distinct words than words

    @property
    def vocab_size(self):
        return len(self._id_to_token)

    def __len__(self):
        return len(self._id_to_token)

    @property
    def vocab(self):
        """A copy of the vocabulary list (index = id)."""
        return list(self._id_to_token)

    @property
    def special_ids(self):
        return {self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id}

    def token_to_id(self, token):
        """The id of `token`, or the [UNK] id when it is not in the vocabulary."""
        return self._token_to_id.get(token, self.unk_id)

    def id_to_token(self, i):
        return self._id_to_token[self._check_id(i)]

    def _check_id(self, i):
        # int() also accepts NumPy integers; a float or str is a caller's mistake worth naming.
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise TypeError(f"token ids must be integers, got {i!r} ({type(i).__name__})")
        i = int(i)
        if not 0 <= i < len(self._id_to_token):
            raise ValueError(f"token id {i} is outside the vocabulary [0, {len(self._id_to_token)})")
        return i

    def _word_pieces(self, word):
        """BERT's WordpieceTokenizer on one word: greedy longest-match-first, all or nothing."""
        if len(word) > MAX_WORD_CHARS:
            return [self.unk_id]
        ids = []
        start = 0
        while start < len(word):
            end = min(len(word), start + self._max_piece_chars)
            while end > start:
                piece = word[start:end] if start == 0 else CONTINUATION + word[start:end]
                if piece in self._token_to_id:
                    ids.append(self._token_to_id[piece])
                    break
                end -= 1
            else:
                # Some suffix matches no piece: BERT gives up on the whole word rather than emit a partial spelling.
                return [self.unk_id]
            start = end
        return ids

    def _encode_word(self, word):
        ids = self._word_cache.get(word)
        if ids is None:
            ids = self._word_cache[word] = tuple(self._word_pieces(word))
        return ids

    def encode(self, text):
        """Token ids of `text`, without [CLS] / [SEP] (packing adds those)."""
        ids = []
        for word in pre_tokenize(text):
            ids.extend(self._encode_word(word))
        return ids

    def encode_many(self, texts):
        if isinstance(texts, str):
            raise TypeError("encode_many takes a list of texts; for one text use encode(text)")
        return [self.encode(t) for t in texts]

    def tokenize(self, text):
        """The WordPiece strings of `text`: tokenize("unaffable") -> ['un', '##aff', '##able'] with BERT's vocab."""
        return [self._id_to_token[i] for i in self.encode(text)]

    def decode(self, ids):
        """Tokens joined by spaces with `##` pieces glued to the piece before them; [PAD] is skipped."""
        words = []
        for i in ids:
            i = self._check_id(i)
            if i == self.pad_id:
                continue
            tok = self._id_to_token[i]
            if tok.startswith(CONTINUATION) and words:
                words[-1] += tok[len(CONTINUATION):]
            else:
                words.append(tok)
        return " ".join(words)

    def save(self, path):
        """Write BERT's vocab.txt: UTF-8, one token per line, line number (from 0) = id."""
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(tok + "\n" for tok in self._id_to_token))
        os.replace(tmp, path)  # atomic: a crash mid-write never leaves a truncated vocab behind

    @classmethod
    def load(cls, path):
        """Read a BERT vocab.txt (such as bert-base-uncased's) or one written by save()."""
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"no vocab file at {path}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: byte {e.start} is not valid UTF-8; a vocab.txt must be UTF-8") from None
        # Split on "\n" only: a vocab may hold exotic tokens that str.splitlines() would break apart (U+2028, \x1c).
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the newline that ends the last line
        return cls([line[:-1] if line.endswith("\r") else line for line in lines])

    def __repr__(self):
        return f"WordPieceTokenizer(vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------------------------------------------------
# Training (Hugging Face's WordPieceTrainer: BPE merges over words, with ## continuation pieces)
# ---------------------------------------------------------------------------------------------------------------------

def train_wordpiece(texts, vocab_size, min_frequency=2):
    """Learn a WordPiece vocabulary of at most `vocab_size` tokens from an iterable of strings.

    Ids 0-4 are the special tokens, then every character seen, both as a word start `c` and as a continuation `##c`
    (so any word made of seen characters encodes without [UNK]), then one new token per merge. Each step merges the
    most frequent adjacent pair of pieces (counted over the word frequencies) into one; ties go to the pair whose ids
    are smallest, which makes training deterministic. Training stops at `vocab_size`, or earlier when no pair occurs
    `min_frequency` times: the returned tokenizer's `vocab_size` says how many tokens it got.
    """
    if isinstance(texts, str):
        raise TypeError("train_wordpiece takes an iterable of texts (e.g. a list of documents), not a single str")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be a positive int, got {min_frequency!r}")

    word_counts = Counter()
    for text in texts:
        word_counts.update(pre_tokenize(text))
    # Words over MAX_WORD_CHARS always encode as [UNK], so they would only waste merges.
    words = sorted(w for w in word_counts if len(w) <= MAX_WORD_CHARS)
    if not words:
        raise ValueError("train_wordpiece got no words: the texts are empty or all whitespace")

    alphabet = sorted({ch for w in words for ch in w})
    vocab = list(SPECIAL_TOKENS) + alphabet + [CONTINUATION + ch for ch in alphabet]
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} is too small: the 5 special tokens and the {len(alphabet)} "
                         f"characters of this corpus (each as c and ##c) already take {len(vocab)} ids; ask for more")
    token_id = {tok: i for i, tok in enumerate(vocab)}

    # Each distinct word as a list of piece ids, e.g. "cat" -> [c, ##a, ##t]; merges rewrite these lists in place.
    spellings = [[token_id[w[0]]] + [token_id[CONTINUATION + ch] for ch in w[1:]] for w in words]
    counts = [word_counts[w] for w in words]

    # pair_count[(a, b)]: how often a is followed by b, over all words weighted by word count.
    # where[(a, b)]: the words that contain the pair, so a merge only revisits those words (not the whole corpus).
    pair_count = Counter()
    where = {}
    for wi, ids in enumerate(spellings):
        for pair in zip(ids, ids[1:]):
            pair_count[pair] += counts[wi]
            where.setdefault(pair, set()).add(wi)

    # A max-heap of (-count, a, b). Counts change after every merge; instead of updating entries in place we push
    # fresh ones when a count grows and re-push a popped entry whose count has shrunk meanwhile ("lazy deletion").
    heap = [(-c, a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        current = pair_count.get((a, b), 0)
        if current != -neg:
            if current:
                heapq.heappush(heap, (-current, a, b))
            continue
        if current < min_frequency:
            break  # the best pair is rarer than allowed, so every other pair is too

        new_token = vocab[a] + vocab[b][len(CONTINUATION):]
        # Two merge paths can spell the same string ("a"+"##bc", "ab"+"##c"): reuse the id rather than duplicate it.
        n = token_id.get(new_token)
        if n is None:
            n = token_id[new_token] = len(vocab)
            vocab.append(new_token)

        grown = set()
        for wi in sorted(where.pop((a, b))):
            old = spellings[wi]
            new = []
            i = 0
            while i < len(old):
                if i + 1 < len(old) and old[i] == a and old[i + 1] == b:
                    new.append(n)
                    i += 2
                else:
                    new.append(old[i])
                    i += 1
            spellings[wi] = new
            c = counts[wi]
            old_pairs = list(zip(old, old[1:]))
            new_pairs = list(zip(new, new[1:]))
            for pair in old_pairs:
                pair_count[pair] -= c
            for pair in new_pairs:
                pair_count[pair] += c
                if n in pair:
                    grown.add(pair)
            for pair in set(old_pairs).difference(new_pairs):
                if pair != (a, b):
                    where[pair].discard(wi)
            for pair in new_pairs:
                where.setdefault(pair, set()).add(wi)
        del pair_count[(a, b)]
        for pair in grown:
            heapq.heappush(heap, (-pair_count[pair], *pair))

    return WordPieceTokenizer(vocab)

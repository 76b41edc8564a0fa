"""Corpora to training batches: read text, split it into documents, tokenise (cached), pack, shuffle, batch.

    load_corpus(path)  ->  documents (list of str)
    train_or_load_tokenizer(documents, vocab_size)  ->  WordPieceTokenizer, cached on disk
    tokenize_corpus(documents, tokenizer)  ->  one id array per document, cached on disk
    pack_sequences(ids, seq_len, ...)  ->  input_ids, attention_mask  (N, seq_len)
    split_train_eval(...)  ->  train and eval sequences
    Batches(input_ids, attention_mask, batch_size, rng)  ->  endless shuffled batches, resumable

A corpus is a UTF-8 text file, a folder of .txt files, or the built-in corpus: the docstrings and comments of the
Python standard library, which is real English on every machine that runs this code, with nothing to download.
"""

import ast
import contextlib
import copy
import csv
import hashlib
import io
import os
import re
import sysconfig
import tokenize as py_tokenize
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .tokenizer import WordPieceTokenizer, train_wordpiece


class DataError(ValueError):
    """Data that cannot be used; the message says which file or which numbers, and what to do."""


class DataWarning(UserWarning):
    """A file of a corpus folder was skipped."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading corpora
# ---------------------------------------------------------------------------------------------------------------------

# A blank line is empty or whitespace only; one or more of them end a document.
_BLANK_LINES = re.compile(r"\n[^\S\n]*(?:\n[^\S\n]*)+")


def split_documents(text):
    """Documents of `text`: the stretches between blank lines, stripped; empty ones dropped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [doc.strip() for doc in _BLANK_LINES.split(text) if doc.strip()]


def read_documents(path):
    """The documents of one UTF-8 text file. A byte-order mark is skipped; bytes that are not UTF-8 are an error."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: byte offset {e.start} is not valid UTF-8 ({e.reason}); corpus files must be UTF-8, "
                        f"so re-encode it (e.g. `iconv -f latin1 -t utf-8 {path.name}`)") from None
    docs = split_documents(text)
    if not docs:
        raise DataError(f"{path} is empty (no text besides whitespace): give a file with some text in it")
    return docs


def _read_folder(folder):
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())  # sorted: the same corpus order on every machine
    docs = []
    for path in files:
        try:
            docs.extend(read_documents(path))
        except DataError as e:
            warnings.warn(f"skipping {path}: {e}", DataWarning, stacklevel=3)
    if not docs:
        raise DataError(f"the folder {folder} holds no usable .txt file ({len(files)} found): "
                        "add UTF-8 .txt files with some text in them")
    return docs


def load_corpus(path=None):
    """Documents of a corpus: a text file, a folder of .txt files (recursive), or None / 'builtin' for the built-in."""
    if path is None or path == "builtin":
        return builtin_corpus()
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if not path.exists():
        raise DataError(f"corpus {path} does not exist: give a UTF-8 text file, a folder of .txt files, or 'builtin'")
    return read_documents(path)


# ---------------------------------------------------------------------------------------------------------------------
# The built-in corpus: the standard library's docstrings and comments
# ---------------------------------------------------------------------------------------------------------------------

# Folders of the standard library whose text is test data, code samples or vendored packages rather than prose.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip",
              "__pycache__", "__phello__"}
_MIN_DOC_CHARS = 40


def _is_prose_line(line):
    """False for lines that are mostly not letters: rulers, ASCII art, tables of numbers, doctest prompts."""
    stripped = line.strip()
    if stripped.startswith((">>>", "...", "$ ")):
        return False
    chars = stripped.replace(" ", "")
    return sum(map(str.isalpha, chars)) >= 0.6 * len(chars)


def _clean_doc(text):
    lines = [line.strip() for line in text.splitlines()]
    doc = "\n".join(line for line in lines if line and _is_prose_line(line))
    return doc if len(doc) >= _MIN_DOC_CHARS else None


def _docstrings(tree):
    """Docstrings of a module and of the classes and functions in it, at any depth.

    Only statements can carry docstrings, so we descend through statement bodies and skip the expressions, which
    are most of a syntax tree: ten times faster than ast.walk.
    """
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            stack.extend(reversed(getattr(node, field, None) or []))


def _comment_blocks(source):
    """Comments of a source file, consecutive comment lines joined into one block."""
    block, last_line = [], None
    for tok in py_tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != py_tokenize.COMMENT:
            continue
        line = tok.start[0]
        if block and line != last_line + 1:
            yield "\n".join(block)
            block = []
        block.append(tok.string.lstrip("#!").strip())
        last_line = line
    if block:
        yield "\n".join(block)


def builtin_corpus():
    """Documents of English from the running Python's standard library: every docstring and comment block.

    The .py files are parsed (`ast`) and tokenised (`tokenize`), never imported or run. A few MB of text in a few
    seconds; files that do not parse are skipped, since they are not what we are here for.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith((".", "config-")))
        files.extend(Path(root) / n for n in sorted(names) if n.endswith(".py"))
    docs = []
    for path in files:
        try:
            source = path.read_bytes().decode("utf-8")
            texts = list(_docstrings(ast.parse(source))) + list(_comment_blocks(source))
        except (SyntaxError, ValueError, py_tokenize.TokenError):  # UnicodeDecodeError is a ValueError
            continue
        docs.extend(doc for doc in map(_clean_doc, texts) if doc)
    if not docs:
        raise DataError(f"found no docstrings under {stdlib}: this Python ships without its standard library "
                        "sources, so give a corpus file or folder instead")
    return docs


# ---------------------------------------------------------------------------------------------------------------------
# Tokenising, with a cache on disk
# ---------------------------------------------------------------------------------------------------------------------

_CACHE_FORMAT = 1  # bump when tokenisation or the file layout changes, so old cache files are not reused


def default_cache_dir():
    """$MINIELECTRA_CACHE, else $XDG_CACHE_HOME/minielectra, else ~/.cache/minielectra."""
    if os.environ.get("MINIELECTRA_CACHE"):
        return Path(os.environ["MINIELECTRA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minielectra"


def _corpus_key(kind, docs, *settings):
    """A hex digest naming a cache file: what it holds (`kind`), its settings, and every document's text."""
    h = hashlib.sha256(f"minielectra-{kind}-{_CACHE_FORMAT}\n".encode())
    for setting in settings:
        data = str(setting).encode("utf-8")
        h.update(len(data).to_bytes(8, "little") + data)
    for doc in docs:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))  # the length keeps ["ab", "c"] and ["a", "bc"] apart
        h.update(data)
    return h.hexdigest()[:32]


def _cache_path(cache_dir, name):
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / name


def _warn_unwritable(path, error):
    warnings.warn(f"could not write the cache file {path} ({error}); continuing without it", DataWarning,
                  stacklevel=3)


def train_or_load_tokenizer(docs, vocab_size, cache_dir=None, min_frequency=2):
    """train_wordpiece(docs, vocab_size, min_frequency), saved as a vocab.txt in the cache and reused next time."""
    docs = list(docs)
    path = _cache_path(cache_dir, f"vocab-{_corpus_key('vocab', docs, vocab_size, min_frequency)}.txt")
    if path.exists():
        return WordPieceTokenizer.load(path)
    tokenizer = train_wordpiece(docs, vocab_size, min_frequency)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(path)
    except OSError as e:
        _warn_unwritable(path, e)
    return tokenizer


def tokenize_corpus(docs, tokenizer, cache_dir=None, use_cache=True):
    """One int32 id array per document (no [CLS] / [SEP]), loaded from `cache_dir` when this exact corpus and
    vocabulary were tokenised before. cache_dir None means default_cache_dir(); use_cache=False skips the disk."""
    if isinstance(docs, str):
        raise TypeError("tokenize_corpus takes a list of documents, not a single str")
    docs = list(docs)
    path = None
    if use_cache:
        path = _cache_path(cache_dir, f"tokens-{_corpus_key('tokens', docs, *tokenizer.vocab)}.npz")
        if path.exists():
            with np.load(path, allow_pickle=False) as f:
                ids, offsets = f["ids"], f["offsets"]
            return np.split(ids, offsets[1:-1])

    encoded = tokenizer.encode_many(docs)
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.fromiter((i for e in encoded for i in e), dtype=np.int32, count=int(offsets[-1]))
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp.npz")
            np.savez(tmp, ids=ids, offsets=offsets)
            os.replace(tmp, path)  # atomic, so a crash never leaves a half-written cache that a later run trusts
        except OSError as e:
            _warn_unwritable(path, e)
    return np.split(ids, offsets[1:-1])


# ---------------------------------------------------------------------------------------------------------------------
# Packing into fixed-length sequences
# ---------------------------------------------------------------------------------------------------------------------

def pack_sequences(docs_ids, seq_len, cls_id, sep_id, pad_id):
    """Pack documents into (N, seq_len) int32 input_ids and attention_mask, each row [CLS] chunk [SEP] [PAD]...

    We concatenate all documents into one token stream and cut it into chunks of seq_len - 2 tokens (RoBERTa's
    "full sentences"). A chunk may end one document and start the next with no marker in between. ELECTRA's own
    script instead fills each sequence with whole sentences and splits the text into two segments; for pre-training
    by replaced-token detection the simpler stream loses nothing that matters and wastes no tokens on padding. Only
    the last row is partial: padded with pad_id, attention_mask 0 from the position after its [SEP].
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 3:
        raise ValueError(f"seq_len must be an int >= 3 ([CLS], at least one token, [SEP]), got {seq_len!r}")
    stream = np.concatenate([np.asarray(d, dtype=np.int32).reshape(-1) for d in docs_ids] or
                            [np.zeros(0, np.int32)])
    if stream.size == 0:
        raise DataError("there are no tokens to pack: the corpus is empty after tokenisation")
    body = seq_len - 2
    n_rows = -(-stream.size // body)  # ceil
    lengths = np.full(n_rows, body)  # (N,) tokens of text in each row
    lengths[-1] = stream.size - (n_rows - 1) * body

    chunks = np.full(n_rows * body, pad_id, dtype=np.int32)
    chunks[:stream.size] = stream
    input_ids = np.full((n_rows, seq_len), pad_id, dtype=np.int32)
    input_ids[:, 0] = cls_id
    input_ids[:, 1:-1] = chunks.reshape(n_rows, body)
    input_ids[np.arange(n_rows), lengths + 1] = sep_id  # right after each row's last token
    attention_mask = (np.arange(seq_len) < (lengths + 2)[:, None]).astype(np.int32)  # (N, T)
    input_ids[attention_mask == 0] = pad_id  # the last row's slot for [SEP] at seq_len - 1 was never written to
    return input_ids, attention_mask


def build_dataset(corpus_path, tokenizer, seq_len, cache_dir=None):
    """load_corpus -> tokenize_corpus -> pack_sequences with the tokenizer's special ids: input_ids, attention_mask."""
    ids = tokenize_corpus(load_corpus(corpus_path), tokenizer, cache_dir=cache_dir)
    return pack_sequences(ids, seq_len, tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id)


# ---------------------------------------------------------------------------------------------------------------------
# Splitting and batching
# ---------------------------------------------------------------------------------------------------------------------

def _check_pair(input_ids, attention_mask):
    input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids and attention_mask must both be (N, seq_len), got {input_ids.shape} and "
                         f"{attention_mask.shape}")
    return input_ids, attention_mask


def split_train_eval(input_ids, attention_mask, eval_fraction, seed):
    """Shuffle the sequences by `seed`, then split: ((train_ids, train_mask), (eval_ids, eval_mask)).

    The eval set gets round(N * eval_fraction) sequences, at least one when eval_fraction > 0.
    """
    input_ids, attention_mask = _check_pair(input_ids, attention_mask)
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(input_ids)
    n_eval = max(1, round(n * eval_fraction)) if eval_fraction > 0 else 0
    if n - n_eval < 1:
        raise DataError(f"{n} sequence(s) cannot be split into a training and an eval set: use a bigger corpus or a "
                        "shorter seq_len")
    order = np.random.default_rng(seed).permutation(n)
    train, held_out = order[n_eval:], order[:n_eval]
    return (input_ids[train], attention_mask[train]), (input_ids[held_out], attention_mask[held_out])


def _to_json(value):
    """A bit generator's state with NumPy arrays (MT19937 keeps one) turned into lists, so it can go into JSON."""
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    return value


class Batches:
    """Endless shuffled batches of (input_ids, attention_mask), each (batch_size, seq_len).

    Every epoch visits the sequences in a fresh order drawn from `rng`, a numpy Generator this object owns (give it
    its own, e.g. `np.random.default_rng(seed)`, so that other random draws do not shift the order); the last
    N % batch_size sequences of an order are left out that epoch so every batch is full. `state_dict()` is plain JSON;
    `load_state_dict()` on a Batches over the same data makes it yield exactly the batches the saved one would have.
    """

    def __init__(self, input_ids, attention_mask, batch_size, rng):
        self.input_ids, self.attention_mask = _check_pair(input_ids, attention_mask)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got "
                            f"{type(rng).__name__}")
        n = len(self.input_ids)
        if n < batch_size:
            raise DataError(f"the corpus packs into {n} sequence(s), fewer than one batch of {batch_size}: use a "
                            "bigger corpus, a smaller batch_size or a shorter seq_len")
        self.batch_size = int(batch_size)
        self.rng = rng
        self.epoch = 0
        self._new_order()

    @property
    def batches_per_epoch(self):
        return len(self.input_ids) // self.batch_size

    def _new_order(self):
        # The generator's state before the draw is all a checkpoint needs to redraw this very order.
        self._order_rng_state = copy.deepcopy(self.rng.bit_generator.state)
        self._order = self.rng.permutation(len(self.input_ids))
        self._next = 0  # index of the next batch within this epoch

    def __iter__(self):
        return self

    def __next__(self):
        if self._next == self.batches_per_epoch:
            self.epoch += 1
            self._new_order()
        rows = self._order[self._next * self.batch_size:(self._next + 1) * self.batch_size]
        self._next += 1
        return self.input_ids[rows], self.attention_mask[rows]

    def state_dict(self):
        return {"num_sequences": len(self.input_ids), "batch_size": self.batch_size, "epoch": self.epoch,
                "next_batch": self._next, "rng_state": _to_json(self._order_rng_state)}

    def load_state_dict(self, state):
        expected = (len(self.input_ids), self.batch_size)
        if (state["num_sequences"], state["batch_size"]) != expected:
            raise DataError(f"the saved batch state is for {state['num_sequences']} sequences in batches of "
                            f"{state['batch_size']}, but this data has {expected[0]} in batches of {expected[1]}: "
                            "resume with the same corpus, tokenizer, seq_len and batch_size")
        self.rng.bit_generator.state = copy.deepcopy(state["rng_state"])
        self._new_order()  # redraws the saved epoch's order and leaves the generator where the saved one was
        self.epoch = state["epoch"]
        self._next = state["next_batch"]


# ---------------------------------------------------------------------------------------------------------------------
# Labelled data for fine-tuning: GLUE-style TSV, CSV, plain "label<TAB>text"; label maps; pair encoding; GLUE download
# ---------------------------------------------------------------------------------------------------------------------

GLUE_SST2_URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
# Known GLUE tasks: where the download lands, and the columns of their TSVs (text a, text b or None, label).
TASKS = {"sst2": {"url": GLUE_SST2_URL, "folder": "SST-2", "text": "sentence", "pair": None, "label": "label"}}
# Header names recognised as the text column(s) of a GLUE-style TSV, tried in order.
_TSV_TEXT_COLUMNS = (("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
                     ("sentence", None), ("text", None))
_MAX_BAD_ROWS_SHOWN = 10
DOWNLOAD_TIMEOUT_S = 30


class LabelledData(NamedTuple):
    """Rows of a labelled file: texts (and second texts for sentence pairs), raw label strings, and line numbers."""
    texts: list  # str per row: sentence a
    pairs: object  # list of str (sentence b) per row, or None for single sentences
    labels: list  # str per row ('' never: a row without a label is a bad row)
    lines: list  # 1-based line number of each row in its file, for error messages
    source: str  # the file's path


def _decode(path):
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"no data file at {path}: check the path") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder: give a .tsv, .csv or .txt file (or a GLUE task folder with --task)") \
            from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: byte offset {e.start} is not valid UTF-8 ({e.reason}); re-encode it as UTF-8") \
            from None


def _csv_rows(text, **fmt):
    """(line number, fields) for every non-blank record. The text is read as a file opened with newline='', so records
    end only at \\n, \\r\\n or \\r, never at U+0085, U+2028 or the other breaks str.splitlines() honours."""
    reader = csv.reader(io.StringIO(text, newline=""), **fmt)
    rows = []
    start = 1
    try:
        for fields in reader:
            if any(f.strip() for f in fields):
                rows.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"line {reader.line_num}: {e}") from None
    return rows


def _bad_rows_error(path, bad, total):
    shown = "; ".join(f"line {n}: {why}" for n, why in bad[:_MAX_BAD_ROWS_SHOWN])
    more = f" (and {len(bad) - _MAX_BAD_ROWS_SHOWN} more)" if len(bad) > _MAX_BAD_ROWS_SHOWN else ""
    return DataError(f"{path}: {len(bad)} of {total} rows are malformed: {shown}{more}. Fix or remove those lines")


def _column(header, name, path, what):
    """The index of column `name` (a header name, or a 0-based index given as an int or a digit string)."""
    if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
        i = int(name)
        if not 0 <= i < len(header):
            raise DataError(f"{path}: the {what} column index {i} is outside the {len(header)} columns")
        return i
    if name not in header:
        raise DataError(f"{path}: no {what} column {name!r}; the header has {', '.join(map(repr, header))}")
    return header.index(name)


def _rows_to_data(path, rows, header, text_col, pair_col, label_col):
    ncols = len(header)
    texts, pairs, labels, lines, bad = [], [] if pair_col is not None else None, [], [], []
    for n, fields in rows:
        if len(fields) != ncols:
            bad.append((n, f"{len(fields)} columns, expected {ncols}"))
            continue
        label = fields[label_col].strip() if label_col is not None else ""
        if label_col is not None and not label:
            bad.append((n, "missing label"))
            continue
        texts.append(fields[text_col])
        if pair_col is not None:
            pairs.append(fields[pair_col])
        labels.append(label)
        lines.append(n)
    if bad:
        raise _bad_rows_error(path, bad, len(rows))
    return LabelledData(texts, pairs, labels, lines, str(path))


def read_glue_tsv(path, text_column=None, pair_column=None, label_column="label", require_labels=True):
    """A GLUE-style TSV: a header row, tab-separated, quoting off (a `"` is an ordinary character, as GLUE ships it).

    The text column(s) default to GLUE's names: sentence1/sentence2 (pairs), question1/question2, question/sentence,
    sentence or text. Without a label column (GLUE's test files) labels are '' when require_labels is False.
    """
    rows = _csv_rows(_decode(path), delimiter="\t", quoting=csv.QUOTE_NONE)
    if not rows:
        raise DataError(f"{path} is empty: a GLUE-style TSV starts with a header row such as 'sentence<TAB>label'")
    (_, header), rows = rows[0], rows[1:]
    header = [h.strip() for h in header]
    if text_column is None:
        for a, b in _TSV_TEXT_COLUMNS:
            if a in header and (b is None or b in header):
                text_column, pair_column = a, b
                break
        else:
            raise DataError(f"{path}: cannot tell the text column from the header {header}: expected 'sentence' (or "
                            "'sentence1' and 'sentence2'); name it with --text-column")
    text_col = _column(header, text_column, path, "text")
    pair_col = None if pair_column is None else _column(header, pair_column, path, "second text")
    if label_column in header or not isinstance(label_column, str) or label_column.isdigit() or require_labels:
        label_col = _column(header, label_column, path, "label")
    else:
        label_col = None
    return _rows_to_data(path, rows, header, text_col, pair_col, label_col)


def read_csv_labelled(path, text_column="text", label_column="label", pair_column=None):
    """A CSV with a header row and ordinary CSV quoting ("a, b" is one field; "" is a quote; fields may span lines)."""
    rows = _csv_rows(_decode(path))
    if not rows:
        raise DataError(f"{path} is empty: a CSV needs a header row naming its text and label columns")
    (_, header), rows = rows[0], rows[1:]
    header = [h.strip() for h in header]
    text_col = _column(header, text_column, path, "text")
    pair_col = None if pair_column is None else _column(header, pair_column, path, "second text")
    return _rows_to_data(path, rows, header, text_col, pair_col, _column(header, label_column, path, "label"))


def read_plain_labelled(path):
    """Headerless 'label<TAB>text' lines (the text may hold more tabs). Split on '\\n' only; a trailing '\\r' goes."""
    text = _decode(path)
    texts, labels, lines, bad, total = [], [], [], [], 0
    for n, line in enumerate(text.split("\n"), start=1):
        line = line[:-1] if line.endswith("\r") else line
        if not line.strip():
            continue
        total += 1
        label, tab, body = line.partition("\t")
        if not tab:
            bad.append((n, "no tab between label and text"))
        elif not label.strip():
            bad.append((n, "missing label"))
        else:
            texts.append(body)
            labels.append(label.strip())
            lines.append(n)
    if bad:
        raise _bad_rows_error(path, bad, total)
    return LabelledData(texts, None, labels, lines, str(path))


def _first_line(path):
    text = _decode(path)
    return text.split("\n", 1)[0].rstrip("\r")


def detect_format(path):
    """'csv' for .csv; 'tsv' (GLUE, with a header) when the first line's tab-separated fields include a known column
    name such as 'label' or 'sentence'; otherwise 'plain' (label<TAB>text)."""
    if Path(path).suffix.lower() == ".csv":
        return "csv"
    fields = {f.strip().lower() for f in _first_line(path).split("\t")}
    known = {"label", "sentence", "sentence1", "sentence2", "question", "question1", "question2", "text"}
    return "tsv" if fields & known else "plain"


def read_labelled(path, fmt="auto", text_column=None, label_column=None, pair_column=None, require_labels=True):
    """Rows of a labelled file in any of the three formats; fmt 'auto' | 'tsv' | 'csv' | 'plain' (see detect_format)."""
    fmt = detect_format(path) if fmt in (None, "auto") else fmt
    if fmt == "tsv":
        return read_glue_tsv(path, text_column, pair_column, label_column or "label", require_labels)
    if fmt == "csv":
        return read_csv_labelled(path, text_column or "text", label_column or "label", pair_column)
    if fmt == "plain":
        return read_plain_labelled(path)
    raise DataError(f"unknown data format {fmt!r}: choose auto, tsv, csv or plain")


def _is_int(s):
    return s.lstrip("-").isdigit() and s.count("-") <= 1


def build_label_map(labels):
    """The label names in id order: integers sorted by value ('0' < '1' < '10'), otherwise strings sorted."""
    names = sorted(set(labels))
    if names and all(_is_int(s) for s in names):
        names.sort(key=int)
    if len(names) < 2:
        raise DataError(f"the training data has {len(names)} distinct label(s) {names}: classification needs at least 2")
    return names


def encode_labels(data: LabelledData, names):
    """int64 label ids of data's rows under the label map `names`; an unknown label is an error that names its lines."""
    index = {name: i for i, name in enumerate(names)}
    # '1' and '01' or '1.0' are the same integer label; match by value when the map is integers
    if all(_is_int(s) for s in names):
        index.update({str(int(s)): i for s, i in list(index.items())})
    ids, bad = [], []
    for label, n in zip(data.labels, data.lines):
        key = label if label in index or not _is_int(label) else str(int(label))
        if key not in index:
            bad.append((n, label))
        else:
            ids.append(index[key])
    if bad:
        shown = ", ".join(f"line {n}: {lab!r}" for n, lab in bad[:_MAX_BAD_ROWS_SHOWN])
        raise DataError(f"{data.source}: {len(bad)} row(s) have a label the model was not trained with ({shown}); "
                        f"the model knows {', '.join(map(repr, names))}")
    return np.asarray(ids, dtype=np.int64)


def subset(data: LabelledData, rows):
    """The rows of data at the given indices, in that order."""
    pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
    return LabelledData(pick(data.texts), None if data.pairs is None else pick(data.pairs), pick(data.labels),
                        pick(data.lines), data.source)


def split_labelled(data: LabelledData, fraction, seed):
    """(train, held_out): round(fraction * N) rows (at least 1) drawn by `seed` are held out, the rest train."""
    n = len(data.texts)
    n_out = max(1, round(n * fraction))
    if n - n_out < 1:
        raise DataError(f"{data.source} has {n} row(s): too few to hold out a validation split; pass --dev")
    order = np.random.default_rng(seed).permutation(n)
    return subset(data, sorted(order[n_out:])), subset(data, sorted(order[:n_out]))


def truncate_pair(a, b, max_tokens):
    """BERT's _truncate_seq_pair: drop the last token of the longer sequence (b on a tie) until both fit together."""
    a, b = list(a), list(b)
    while len(a) + len(b) > max_tokens:
        if len(a) > len(b):
            a.pop()
        else:
            b.pop()
    return a, b


def encode_texts(tokenizer, texts, pairs, seq_len):
    """input_ids, attention_mask, token_type_ids (N, seq_len) int32 of `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`:
    truncated to seq_len (the longer of a pair first), padded with [PAD] (mask 0); token type 0 for [CLS] a [SEP],
    1 for b [SEP]."""
    if seq_len < 3 + (pairs is not None):
        raise ValueError(f"seq_len {seq_len} leaves no room for text between the special tokens")
    n = len(texts)
    input_ids = np.full((n, seq_len), tokenizer.pad_id, dtype=np.int32)
    types = np.zeros((n, seq_len), dtype=np.int32)
    mask = np.zeros((n, seq_len), dtype=np.int32)
    encoded_a = tokenizer.encode_many(texts)
    encoded_b = tokenizer.encode_many(pairs) if pairs is not None else None
    for i, a in enumerate(encoded_a):
        if encoded_b is None:
            row, n_a = [tokenizer.cls_id, *a[:seq_len - 2], tokenizer.sep_id], None
        else:
            a, b = truncate_pair(a, encoded_b[i], seq_len - 3)
            row = [tokenizer.cls_id, *a, tokenizer.sep_id, *b, tokenizer.sep_id]
            n_a = len(a) + 2
        input_ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
        if n_a is not None:
            types[i, n_a:len(row)] = 1
    return input_ids, mask, types


def download_glue_task(task, cache_dir=None, timeout=DOWNLOAD_TIMEOUT_S):
    """The folder of GLUE `task` (train.tsv, dev.tsv, ...), downloaded and unzipped into the cache the first time.

    Offline, this is a DataError that says to pass --data.
    """
    import urllib.error
    import urllib.request
    import zipfile

    if task not in TASKS:
        raise DataError(f"unknown task {task!r}: known tasks are {', '.join(TASKS)}; or give --data FILE")
    spec = TASKS[task]
    root = _cache_path(cache_dir, "glue")
    folder = root / spec["folder"]
    if (folder / "train.tsv").exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    zip_path = root / f"{spec['folder']}.zip"
    tmp = zip_path.with_name(zip_path.name + ".part")
    try:
        with urllib.request.urlopen(spec["url"], timeout=timeout) as response, open(tmp, "wb") as f:
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
        os.replace(tmp, zip_path)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        reason = getattr(e, "reason", None) or e
        raise DataError(f"could not download GLUE {task} from {spec['url']} ({reason}); offline, pass the data "
                        f"yourself with --data (a train.tsv file or a folder holding one)") from None
    try:
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(root)  # the archive holds one folder, e.g. SST-2/
    except zipfile.BadZipFile:
        zip_path.unlink()
        raise DataError(f"the download of {spec['url']} is not a zip file; try again, or pass --data") from None
    if not (folder / "train.tsv").exists():
        raise DataError(f"{zip_path} does not hold {spec['folder']}/train.tsv; pass --data instead")
    return folder

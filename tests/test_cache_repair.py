"""A re-run of ``mentor cache`` repairs a damaged complete cache (missing, truncated or corrupt
shards, found by size and sha256), and reading a damaged cache names the shard and the fix."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from mentor.cache import CacheError, CacheSettings, open_store, verify_cache, write_cache
from mentor.cli import main

SETTINGS = dict(top_k=3, samples=4, rows_per_shard=40, row_group_positions=10, batch_size=8)


@pytest.fixture(scope="module")
def toy(cache_toy):
    return cache_toy


def _flip(path, at=None):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 if at is None else at] ^= 0xFF
    path.write_bytes(bytes(raw))


def _write(toy, root, counted):
    """Write (or re-run) the cache with the counting teacher (its provenance stays the same)."""
    counted.calls = 0
    return write_cache(
        counted, {"train": toy[0].train}, root, CacheSettings(**SETTINGS), progress=False
    )


def test_rerun_repairs_exactly_the_missing_and_corrupt_shards(tmp_path, toy, capsys, counting):
    root = tmp_path / "c"
    counted = counting(toy[1])
    full = _write(toy, root, counted)
    assert len(full["shards"]) == 5  # 180 train rows, 40 per shard
    shards = root / "shards"
    before = {p.name: p.read_bytes() for p in shards.glob("*.parquet")}
    (shards / "train-00001.parquet").unlink()
    _flip(shards / "train-00003.parquet")  # same size: only the sha256 tells
    assert (shards / "train-00003.parquet").stat().st_size == full["shards"][3]["bytes"]
    capsys.readouterr()

    repaired = _write(toy, root, counted)
    assert counted.calls == 2 * 40 // 8  # two shards of 40 rows, batches of 8
    assert [s["sha256"] for s in repaired["shards"]] == [s["sha256"] for s in full["shards"]]
    assert repaired["totals"] == full["totals"]
    assert {p.name: p.read_bytes() for p in shards.glob("*.parquet")} == before
    assert verify_cache(root) == []
    err = capsys.readouterr().err
    assert "shards/train-00001.parquet: missing" in err
    assert "shards/train-00003.parquet: sha256 mismatch" in err
    assert "repaired 2 shard(s) (shards/train-00001.parquet, shards/train-00003.parquet)" in err
    assert "train-00000" not in err and "train-00002" not in err
    assert json.loads((root / "manifest.json").read_text())["shards"] == repaired["shards"]

    # a complete, intact cache is returned as it is: nothing recomputed, nothing printed
    again = _write(toy, root, counted)
    assert counted.calls == 0 and again == repaired
    assert capsys.readouterr().err == ""


def test_corrupt_shard_is_recomputed_even_when_its_record_was_rewritten(tmp_path, toy, counting):
    from mentor.cache.format import sha256_file

    root = tmp_path / "c"
    counted = counting(toy[1])
    full = _write(toy, root, counted)
    f = root / "shards" / "train-00002.parquet"
    _flip(f)
    rec_path = root / "shards" / "train-00002.done.json"
    rec = json.loads(rec_path.read_text())
    rec["sha256"] = sha256_file(f)  # the shard record now agrees with the corrupt file
    rec_path.write_text(json.dumps(rec))
    repaired = _write(toy, root, counted)
    assert counted.calls == 40 // 8
    assert repaired["shards"][2]["sha256"] == full["shards"][2]["sha256"]
    assert verify_cache(root) == []


def test_truncated_shard_and_unreadable_manifest_are_repaired(tmp_path, toy, capsys, counting):
    root = tmp_path / "c"
    counted = counting(toy[1])
    full = _write(toy, root, counted)
    f = root / "shards" / "train-00003.parquet"
    f.write_bytes(f.read_bytes()[:-50])
    _write(toy, root, counted)
    assert counted.calls == 40 // 8
    assert "shards/train-00003.parquet: truncated" in capsys.readouterr().err
    assert verify_cache(root) == []

    # a garbled manifest is rebuilt from the (checked) shard records, nothing recomputed
    (root / "manifest.json").write_text("{not json")
    rebuilt = _write(toy, root, counted)
    assert counted.calls == 0
    assert rebuilt["shards"] == full["shards"]
    assert "manifest.json: unreadable" in capsys.readouterr().err
    assert verify_cache(root) == []


def test_cli_rerun_repairs_and_says_which_shards(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "repair",
                "teacher": {"builder": "mlp", "params": {"hidden": [16]}},
                "student": {"builder": "mlp", "params": {"hidden": [8]}},
                "data": {"source": "random", "params": {"n": 120, "num_classes": 4}},
                "train": {"max_steps": 2, "batch_size": 16, "progress": False},
                "output": {"dir": str(tmp_path / "run")},
            }
        )
    )
    cache = tmp_path / "cache"
    args = ["cache", str(recipe), "--out", str(cache), "--top-k", "2", "--rows-per-shard", "30"]
    assert main(args) == 0
    _flip(cache / "shards" / "train-00001.parquet")
    assert main(["cache", "verify", str(cache)]) == 1
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "train-00001.parquet: sha256 mismatch" in err
    assert "repaired 1 shard(s) (shards/train-00001.parquet)" in err
    assert main(["cache", "verify", str(cache)]) == 0


# ----------------------------------------------------------------------------- reading


def _fix_hint(root):
    return f"mentor cache verify {root}", "re-run the `mentor cache"


def test_reading_a_truncated_or_missing_shard_names_it_and_the_fix(tmp_path, toy, counting):
    root = tmp_path / "c"
    _write(toy, root, counting(toy[1]))
    f = root / "shards" / "train-00002.parquet"
    good = f.read_bytes()
    f.write_bytes(good[:-100])
    with pytest.raises(CacheError) as e:
        open_store(root)
    msg = str(e.value)
    assert "shards/train-00002.parquet has" in msg and "truncated" in msg
    assert all(h in msg for h in _fix_hint(root))
    f.unlink()
    with pytest.raises(CacheError) as e:
        open_store(root)
    msg = str(e.value)
    assert "shards/train-00002.parquet is missing" in msg
    assert all(h in msg for h in _fix_hint(root))


def test_reading_a_flipped_byte_never_gives_wrong_signals(tmp_path, toy, counting):
    """A flipped byte anywhere in a shard either leaves the decoded signals as they were (an
    unused byte) or raises a CacheError naming the shard and the fix: never other values,
    never a bare pyarrow/decode error (pages carry CRC32 checksums the reader verifies)."""
    bundle, _ = toy
    root = tmp_path / "c"
    _write(toy, root, counting(toy[1]))
    ids = [int(bundle.train[i]["index"]) for i in range(len(bundle.train))]
    ref = open_store(root).batch(ids)
    ref_s = open_store(root, kind="sampled").batch(ids)
    f = root / "shards" / "train-00001.parquet"
    good = f.read_bytes()
    failures = 0
    for at in range(4, len(good) - 8, max(1, len(good) // 80)):
        _flip(f, at)
        try:
            got = open_store(root).batch(ids)
            got_s = open_store(root, kind="sampled").batch(ids)
        except CacheError as e:
            failures += 1
            msg = str(e)
            assert "shards/train-00001.parquet" in msg, msg
            assert all(h in msg for h in _fix_hint(root)), msg
        else:
            assert torch.equal(got.indices, ref.indices), at
            assert torch.equal(got.logprobs, ref.logprobs) and torch.equal(got.tail, ref.tail)
            assert torch.equal(got_s.indices, ref_s.indices), at
            assert torch.equal(got_s.counts, ref_s.counts), at
        finally:
            f.write_bytes(good)
    assert failures > 40  # most bytes matter: data pages (CRC32) and the footer

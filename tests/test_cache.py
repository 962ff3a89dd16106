"""Teacher-signal cache: round trip, resume after a kill, verify, provenance, training parity."""

from __future__ import annotations

import copy
import json

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from mentor.cache import (
    CacheError,
    CacheSettings,
    describe,
    open_store,
    verify_cache,
    write_cache,
)
from mentor.cli import main
from mentor.config import load_config
from mentor.engine import Distiller
from mentor.losses import Objective
from mentor.signals import Sampled, TopK
from mentor.teachers import CachedTeacher, OnlineTeacher

TOL = {"fp16": 1e-3, "bf16": 8e-3, "fp32": 1e-6}  # relative rounding of the stored log-probs


class LMData(Dataset):
    """Token sequences of uneven length (right padded), ids not equal to positions."""

    def __init__(self, n: int = 12, t: int = 10, vocab: int = 128, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, t), generator=g)
        self.mask = torch.zeros(n, t, dtype=torch.long)
        for i in range(n):
            self.mask[i, : 2 + (i * 7) % (t - 1)] = 1
        self.index = torch.arange(100, 100 + n)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "index": self.index[i]}


@pytest.fixture(scope="module")
def toy(cache_toy):
    return cache_toy


def _logits(teacher, data, ids_pos):
    with torch.no_grad():
        return teacher(torch.stack([data[i]["inputs"] for i in ids_pos]))


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_round_trip_classification(tmp_path, toy, dtype):
    bundle, teacher = toy
    s = CacheSettings(top_k=3, samples=8, dtype=dtype, rows_per_shard=50, row_group_positions=16)
    m = write_cache(teacher, {"train": bundle.train}, tmp_path / "c", s, progress=False)
    assert m["totals"]["rows"] == len(bundle.train) and len(m["shards"]) == 4
    store = open_store(tmp_path / "c")
    pos = [0, 7, 51, 179, 3]  # across shards and row groups, out of order
    ids = [int(bundle.train[i]["index"]) for i in pos]
    ref = TopK.from_logits(_logits(teacher, bundle.train, pos), 3)
    got = store.batch(ids)
    assert isinstance(got, TopK) and got.shape == (5,)
    assert torch.equal(got.indices, ref.indices)
    torch.testing.assert_close(got.logprobs, ref.logprobs, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(got.tail, ref.tail, rtol=TOL[dtype], atol=TOL[dtype])
    one = store[ids[2]]
    assert torch.equal(one.indices, ref.indices[2])
    sam = open_store(tmp_path / "c", kind="sampled").batch(ids)
    assert isinstance(sam, Sampled) and sam.counts.sum(-1).eq(8).all()
    with pytest.raises(KeyError, match="example id 999999 is not in teacher cache"):
        store.batch([999999])


def test_round_trip_per_token_lines_up_with_the_engine_shift(tmp_path, tiny_lm):
    data = LMData()
    s = CacheSettings(top_k=5, samples=16, dtype="fp32", rows_per_shard=5, batch_size=4)
    write_cache(tiny_lm, {"train": data}, tmp_path / "c", s, progress=False)
    store = open_store(tmp_path / "c")
    with torch.no_grad():
        logits = tiny_lm(input_ids=data.ids, attention_mask=data.mask).logits
    ref = TopK.from_logits(logits, 5)
    pos = [3, 0, 11, 6]
    got = store.batch([int(data.index[i]) for i in pos])
    assert got.shape == (4, 10) and got.k == 5
    for j, i in enumerate(pos):
        n = int(data.mask[i].sum())
        assert torch.equal(got.indices[j, :n], ref.indices[i, :n])
        torch.testing.assert_close(got.logprobs[j, :n], ref.logprobs[i, :n])
        assert torch.all(got.logprobs[j, n:, 0] == 0)  # padding: a valid one-hot at id 0
    shifted = got[:, :-1]  # what the engine does to per-token teacher signals
    assert shifted.shape == (4, 9)
    sam = open_store(tmp_path / "c", kind="sampled").batch([100, 101])
    assert sam.shape == (2, 10)
    assert sam.counts[0, : int(data.mask[0].sum())].sum(-1).eq(16).all()
    assert sam.counts[0, int(data.mask[0].sum()) :].sum() == 0


def test_kill_and_resume_gives_the_same_store(tmp_path, toy, monkeypatch, counting):
    bundle, teacher = toy
    s = CacheSettings(top_k=4, samples=8, rows_per_shard=40, row_group_positions=10, batch_size=8)
    splits = {"train": bundle.train, "val": bundle.val}
    full = write_cache(teacher, splits, tmp_path / "full", s, progress=False)

    real = pq.ParquetWriter.write_table
    calls = {"n": 0}

    def dying(self, table, *a, **k):
        calls["n"] += 1
        if calls["n"] == 10:  # shard 3: after 1 of its 4 row groups reached the file
            raise RuntimeError("simulated kill")
        return real(self, table, *a, **k)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", dying)
    counted = counting(teacher)
    with pytest.raises(RuntimeError, match="simulated kill"):
        write_cache(counted, splits, tmp_path / "res", s, progress=False)
    monkeypatch.setattr(pq.ParquetWriter, "write_table", real)
    shards = tmp_path / "res" / "shards"
    assert not (tmp_path / "res" / "manifest.json").exists()
    assert (shards / "train-00002.parquet.tmp").exists()  # the partial shard keeps its temp name
    assert not (shards / "train-00002.parquet").exists()
    assert len(list(shards.glob("*.done.json"))) == 2
    with pytest.raises(CacheError, match="incomplete.*re-run the same"):
        open_store(tmp_path / "res")
    assert "incomplete" in verify_cache(tmp_path / "res")[0]

    counted.calls = 0
    resumed = write_cache(counted, splits, tmp_path / "res", s, progress=False)
    n_total = sum(len(d) for d in splits.values())
    assert counted.calls * 8 < n_total  # only unfinished shards were recomputed
    assert [sh["sha256"] for sh in resumed["shards"]] == [sh["sha256"] for sh in full["shards"]]
    assert resumed["totals"] == full["totals"]
    assert not list(shards.glob("*.tmp"))
    assert verify_cache(tmp_path / "res") == []
    # a finished cache is left alone; other settings are refused with the field named
    counted.calls = 0
    assert write_cache(counted, splits, tmp_path / "res", s, progress=False)["shards"]
    assert counted.calls == 0
    with pytest.raises(CacheError, match="settings.top_k"):
        write_cache(counted, splits, tmp_path / "res", CacheSettings(top_k=5), progress=False)


def test_verify_names_the_shard_and_the_problem(tmp_path, toy, capsys):
    bundle, teacher = toy
    s = CacheSettings(top_k=2, rows_per_shard=60)
    write_cache(teacher, {"train": bundle.train}, tmp_path / "c", s, progress=False)
    root = tmp_path / "c"
    assert main(["cache", "verify", str(root)]) == 0
    # flipped byte
    f1 = root / "shards" / "train-00001.parquet"
    raw = bytearray(f1.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f1.write_bytes(bytes(raw))
    # truncated shard
    f2 = root / "shards" / "train-00002.parquet"
    f2.write_bytes(f2.read_bytes()[:-100])
    problems = verify_cache(root)
    assert any("train-00001.parquet: sha256 mismatch" in p for p in problems)
    assert any("train-00002.parquet: truncated" in p for p in problems)
    assert main(["cache", "verify", str(root)]) == 1
    assert "train-00002.parquet: truncated" in capsys.readouterr().err
    with pytest.raises(CacheError, match="train-00002.parquet has .* bytes"):
        open_store(root)
    (root / "manifest.json").unlink()
    assert "no manifest.json" in verify_cache(root)[0]


def test_provenance_mismatch_is_refused(tmp_path, toy):
    bundle, teacher = toy
    write_cache(teacher, {"train": bundle.train}, tmp_path / "c", progress=False)
    ok = describe(teacher, {"train": bundle.train})
    open_store(tmp_path / "c", expected=ok)
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other[2].bias.add_(0.1)
    with pytest.raises(CacheError, match=r"teacher\.weights_sha256: cache .* recipe's teacher"):
        open_store(tmp_path / "c", expected=describe(other, {"train": bundle.train}))
    with pytest.raises(CacheError, match=r"data\.splits\.train\.fingerprint"):
        open_store(tmp_path / "c", expected=describe(teacher, {"train": bundle.val}))
    with pytest.raises(CacheError, match=r"teacher\.precision"):
        open_store(tmp_path / "c", expected=describe(teacher, {"train": bundle.train}, "bf16"))
    with pytest.warns(UserWarning, match="weights_sha256"):
        open_store(tmp_path / "c", check="warn", expected=describe(other, {"train": bundle.train}))
    open_store(tmp_path / "c", check="off", expected=describe(other, {"train": bundle.train}))


def _recipe(tmp_path, **teacher):
    return {
        "name": "cache-test",
        "teacher": {"builder": "mlp", "params": {"hidden": [32]}, **teacher},
        "student": {"builder": "mlp", "params": {"hidden": [8]}},
        "data": {"source": "random", "params": {"n": 200, "num_classes": 4}},
        "objective": {"kd": {"weight": 1.0, "temperature": 2.0}},
        "train": {"max_steps": 3, "batch_size": 16, "progress": False},
        "output": {"dir": str(tmp_path / "run")},
    }


def test_cli_cache_then_distill_from_it_and_refuse_another_teacher(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tmp_path)))
    cache = tmp_path / "cache"
    args = ["cache", str(recipe), "--out", str(cache), "--top-k", "4", "train.seed=0"]
    assert main(args) == 0
    m = json.loads((cache / "manifest.json").read_text())
    assert m["teacher"]["name"] == "mlp" and m["signals"]["topk"]["k"] == 4
    assert main(["plan", str(recipe), "--top-k", "4"]) == 0
    from mentor.assembly import distill

    use = ["teacher.source=cache", f"teacher.cache={cache}", "output.overwrite=true"]
    res = distill(load_config(str(recipe), use), quiet=True)
    assert (res.run_dir / "student").exists()
    other = [*use, "teacher.params.hidden=[33]"]
    with pytest.raises(CacheError, match="teacher.weights_sha256"):
        distill(load_config(str(recipe), other), quiet=True)
    with pytest.warns(UserWarning):
        distill(load_config(str(recipe), [*other, "teacher.cache_check=warn"]), quiet=True)
    with pytest.raises(CacheError, match="data.splits.train.fingerprint"):
        distill(load_config(str(recipe), [*use, "data.params.n=220"]), quiet=True)


def _cfg(tmp_path, objective, steps=4, bs=8):
    return load_config(
        {
            "objective": objective,
            "train": {"max_steps": steps, "batch_size": bs, "lr": 1e-2, "progress": False},
            "output": {"dir": str(tmp_path)},
        },
        ["train.log_every=1"],
    )


def test_training_from_the_cache_matches_the_online_teacher(tmp_path, toy, tiny_lm):
    bundle, teacher = toy
    s = CacheSettings(top_k=6, dtype="fp32")  # k = V: the cache holds the whole distribution
    write_cache(teacher, {"train": bundle.train}, tmp_path / "c", s, progress=False)
    runs = []
    for name, src in [
        ("online", OnlineTeacher(teacher)),
        ("cached", CachedTeacher(open_store(tmp_path / "c"))),
    ]:
        cfg = _cfg(tmp_path / name, {"kd": {"weight": 1.0, "temperature": 2.0}})
        torch.manual_seed(1)
        student = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 6))
        d = Distiller(student, src, Objective(cfg.objective), bundle.train, cfg)
        d.fit()
        runs.append([r["loss"] for r in d.history])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)

    # causal LM: per-token signals go through the engine's causal shift
    data = LMData(n=8)
    lm_teacher = copy.deepcopy(tiny_lm)
    with torch.no_grad():
        for p in lm_teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    s = CacheSettings(top_k=128, dtype="fp32", rows_per_shard=3)
    write_cache(lm_teacher, {"train": data}, tmp_path / "lm", s, progress=False)
    lm_runs = []
    for name, src in [
        ("lm_online", OnlineTeacher(lm_teacher)),
        ("lm_cached", CachedTeacher(open_store(tmp_path / "lm"))),
    ]:
        cfg = _cfg(tmp_path / name, {"fkl": {"loss": "forward_kl", "weight": 1.0}}, 2, 4)
        student = copy.deepcopy(tiny_lm).train()
        d = Distiller(student, src, Objective(cfg.objective), data, cfg, task="causal_lm")
        d.fit()
        lm_runs.append([r["loss"] for r in d.history])
    assert lm_runs[0] == pytest.approx(lm_runs[1], rel=1e-5)


def test_cached_teacher_with_a_student_built_from_the_teacher(tmp_path):
    """tiny-lm's `shrink` student needs the teacher module even when the signal is cached."""
    from mentor.assembly import distill

    base = [f"output.dir={tmp_path}/run", "train.progress=false", "eval.every=null",
            "teacher.fit.epochs=1", "train.max_steps=3", "data.params.n=64"]  # fmt: skip
    cache = tmp_path / "cache"
    assert main(["cache", "tiny-lm", "--out", str(cache), "--top-k", "8", *base]) == 0
    use = [*base, "teacher.source=cache", f"teacher.cache={cache}"]
    res = distill(load_config("tiny-lm", use), quiet=True)
    assert res.student.config.num_hidden_layers == 1
    assert (res.run_dir / "student").exists()


def test_cached_features_reach_feature_terms_like_the_online_teacher(tmp_path, toy):
    """A features-only cache (an embedding teacher's 'output') trains like the online teacher."""
    bundle, teacher = toy
    s = CacheSettings(top_k=0, features=["output"], dtype="fp32")
    write_cache(teacher, {"train": bundle.train}, tmp_path / "f", s, progress=False)
    store = open_store(tmp_path / "f")
    cached = CachedTeacher(store)
    assert cached.features == ["output"] and not cached.has_logits
    objective = {"emb": {"loss": "cosine_embedding", "student": "output", "teacher": "output"}}
    runs = []
    for name, src in [("online", OnlineTeacher(teacher)), ("cached", cached)]:
        cfg = _cfg(tmp_path / name, objective)
        torch.manual_seed(1)
        student = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 6))
        d = Distiller(student, src, Objective(cfg.objective), bundle.train, cfg)
        d.fit()
        runs.append([r["loss"] for r in d.history])
    assert runs[0][0] > 0.01 and runs[0] == pytest.approx(runs[1], rel=1e-5)
    with pytest.raises(ValueError, match=r"no feature 'encoder.layer.1'.*--features"):
        CachedTeacher(store, features=["encoder.layer.1"])


def test_a_topk_teacher_function_writes_the_dense_paths_topk_records(tmp_path, tiny_lm):
    """A teacher function returning TopK (e.g. a served teacher) is stored as given: the same
    records as dense logits cut to the top-k by the writer; a smaller --top-k folds the rest
    into the tail; --samples and a larger --top-k are refused."""
    data = LMData()
    splits = {"train": data}
    prov = describe(tiny_lm, splits)

    def dense(batch):
        with torch.no_grad():
            return tiny_lm(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits, {}

    def sparse(batch):
        return TopK.from_logits(dense(batch)[0], 8), {}

    def records(fn, out, k):
        s = CacheSettings(top_k=k, dtype="fp32", rows_per_shard=5, batch_size=4)
        m = write_cache(fn, splits, tmp_path / out, s, provenance=prov, progress=False)
        assert m["signals"]["topk"]["k"] == k
        cols = ["id", "length", "topk_indices", "topk_logprobs", "topk_tail"]
        tables = [pq.read_table(tmp_path / out / sh["file"], columns=cols) for sh in m["shards"]]
        return {c: sum((t.column(c).to_pylist() for t in tables), []) for c in cols}

    assert records(sparse, "sparse8", 8) == records(dense, "dense8", 8)
    cut, ref = records(sparse, "sparse5", 5), records(dense, "dense5", 5)
    for c in ("id", "length", "topk_indices", "topk_logprobs"):
        assert cut[c] == ref[c], c
    for a, b in zip(cut["topk_tail"], ref["topk_tail"]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)
    with pytest.raises(CacheError, match="--samples 4: the teacher returns a top-8 signal"):
        write_cache(sparse, splits, tmp_path / "s", CacheSettings(top_k=8, samples=4),
                    provenance=prov, progress=False)  # fmt: skip
    with pytest.raises(CacheError, match="--top-k 9 is above the k=8"):
        write_cache(sparse, splits, tmp_path / "k", CacheSettings(top_k=9), provenance=prov,
                    progress=False)  # fmt: skip

"""``teacher.source: routed``: each example's signal comes from ONE member teacher, chosen by a
data field (each member runs on its own rows only) or by per-example confidence (per sequence
for causal LMs, over the positions the loss counts); the routed signal caches with the routing
spec in its provenance; the prompts source passes a JSONL field (``domain``) through to the
batch. Tiny models built in-process only."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mentor.assembly import Assembly, cache_recipe, distill
from mentor.cache import CacheSettings, open_store
from mentor.cache.format import CacheError, read_manifest
from mentor.config import ConfigError, load_config
from mentor.data import build_data
from mentor.signals import TopK
from mentor.teachers import OnlineTeacher
from mentor.teachers.routed import ROUTE_FEATURE, RoutedTeacher
from prompt_data import N_WORDS, save_tiny_llama


@pytest.fixture(autouse=True)
def _one_thread(one_thread, monkeypatch):
    monkeypatch.delenv("MENTOR_DEBUG", raising=False)


class Rows(nn.Module):
    """A linear classifier that records how many rows each call saw."""

    def __init__(self, seed: int, n_in: int = 16, n_out: int = 4) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin, self.seen = nn.Linear(n_in, n_out), []

    def forward(self, x):
        self.seen.append(len(x))
        return self.lin(x)


class Fixed(nn.Module):
    """Returns fixed logits for the first ``len(batch)`` rows (any input layout)."""

    def __init__(self, z: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("z", z)

    def forward(self, x=None, input_ids=None, attention_mask=None, position_ids=None):
        n = len(x if x is not None else input_ids)
        return self.z[:n]


def _batch(n: int = 8):
    g = torch.Generator().manual_seed(0)
    return {
        "inputs": torch.randn(n, 16, generator=g),
        "index": torch.arange(100, 100 + n),
        "domain": ["news", "code", "code", "news", "legal", "code", "news", "news"][:n],
    }


# ----------------------------------------------------------------------------- field routing


def test_field_routing_gives_each_example_its_members_signal_and_runs_members_on_their_rows():
    a, b = Rows(0), Rows(1)
    src = RoutedTeacher(
        [OnlineTeacher(a), OnlineTeacher(b)],
        field="domain",
        routes={"news": "newsy", "code": 1},
        default=0,
        names=["newsy", "coder"],
    )
    batch = _batch()
    out = src(batch)
    want = [0, 1, 1, 0, 0, 1, 0, 0]  # legal -> default (member 0)
    assert out.features[ROUTE_FEATURE].tolist() == want
    with torch.no_grad():
        za, zb = a.lin(batch["inputs"]), b.lin(batch["inputs"])
    for i, m in enumerate(want):
        torch.testing.assert_close(out.logits[i], (za if m == 0 else zb)[i])
    assert a.seen == [5] and b.seen == [3]  # each member computed only its own rows
    assert src.counts == [5, 3]
    assert src.split_line() == "newsy: 5, coder: 3 (by domain)"
    # a batch routed to one member is answered by it alone
    one = {k: v[1:3] for k, v in batch.items()}
    assert torch.equal(src(one).logits, b.lin(one["inputs"]).detach())
    assert a.seen == [5] and src.counts == [5, 5]


def test_field_routing_on_a_tensor_field_and_unmapped_values_are_named():
    src = RoutedTeacher([OnlineTeacher(Rows(0)), OnlineTeacher(Rows(1))], field="labels",
                        routes={0: 0, 1: 1, 2: 1})  # fmt: skip
    batch = {**_batch(4), "labels": torch.tensor([2, 0, 1, 0])}
    assert src(batch).features[ROUTE_FEATURE].tolist() == [1, 0, 1, 0]
    batch["labels"] = torch.tensor([3, 0, 3, 0])
    with pytest.raises(ValueError, match=r"no route for labels='3' \(example ids 100, 102\).*"
                       r"teacher.routes or set teacher.default"):  # fmt: skip
        src(batch)
    strict = RoutedTeacher([OnlineTeacher(Rows(0)), OnlineTeacher(Rows(1))], field="domain",
                           routes={"news": 0, "code": 1})  # fmt: skip
    with pytest.raises(ValueError, match="no route for domain='legal'"):
        strict(_batch())
    with pytest.raises(KeyError, match=r"batch has no field 'domain'.*data.params.fields"):
        strict({"inputs": torch.randn(2, 16)})


def test_members_must_share_the_output_space():
    src = RoutedTeacher([OnlineTeacher(Rows(0)), OnlineTeacher(Rows(1, n_out=5))],
                        field="domain", routes={"news": 0, "code": 1}, default=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"member 1 gives 5 classes/vocabulary entries but "
                       r"member 0 gives 4.*same classes"):  # fmt: skip
        src(_batch())


# ----------------------------------------------------------------------------- confidence


def test_confidence_routing_picks_the_more_confident_member_per_example():
    g = torch.Generator().manual_seed(1)
    za, zb = torch.randn(8, 5, generator=g) * 3, torch.randn(8, 5, generator=g) * 3
    for kind in ("max_prob", "entropy"):
        src = RoutedTeacher([OnlineTeacher(Fixed(za)), OnlineTeacher(Fixed(zb))],
                            route_by="confidence", confidence=kind)  # fmt: skip
        out = src({"inputs": torch.zeros(8, 1)})
        pa, pb = za.softmax(-1), zb.softmax(-1)
        if kind == "max_prob":
            ca, cb = pa.max(-1).values, pb.max(-1).values
        else:
            ca, cb = (pa * pa.log()).sum(-1), (pb * pb.log()).sum(-1)
        want = (cb > ca).long()
        assert 0 < int(want.sum()) < 8  # both members serve some examples
        assert torch.equal(out.features[ROUTE_FEATURE], want)
        torch.testing.assert_close(out.logits, torch.where(want[:, None].bool(), zb, za))


def test_confidence_of_a_causal_lm_is_the_mean_over_the_positions_the_loss_counts():
    v, big = 8, 20.0
    za = torch.zeros(2, 4, v)  # confident at positions 0 and 3 (not counted), uniform between
    za[:, 0, 1] = za[:, 3, 1] = big
    zb = torch.zeros(2, 4, v)  # fairly confident where the loss counts (positions 1, 2)
    zb[:, 1, 2] = zb[:, 2, 2] = 3.0
    batch = {
        "input_ids": torch.ones(2, 4, dtype=torch.long),
        "attention_mask": torch.ones(2, 4, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]]),
    }
    src = RoutedTeacher([OnlineTeacher(Fixed(za)), OnlineTeacher(Fixed(zb))],
                        route_by="confidence", per_token=True)  # fmt: skip
    out = src(batch)
    assert out.features[ROUTE_FEATURE].tolist() == [1, 1]
    torch.testing.assert_close(out.logits, zb)
    # counting every position instead (no masks, per-token view off) would pick member 0
    plain = {"input_ids": batch["input_ids"]}
    flat = RoutedTeacher([OnlineTeacher(Fixed(za)), OnlineTeacher(Fixed(zb))],
                         route_by="confidence", per_token=False)  # fmt: skip
    assert flat(plain).features[ROUTE_FEATURE].tolist() == [0, 0]


# ----------------------------------------------------------------------------- recipes


MEMBERS = "[{builder: mlp, params: {hidden: [8]}}, {builder: mlp, params: {hidden: [12]}}]"


def _recipe(tmp_path, *over):
    spec = {
        "name": "routed-test",
        "teacher": {
            "source": "routed",
            "field": "labels",
            "routes": {0: 0, 1: 0},
            "default": 1,
        },  # fmt: skip
        "student": {"builder": "mlp", "params": {"hidden": [8]}},
        "data": {"source": "random", "params": {"n": 96, "in_features": 16, "num_classes": 4}},
        "objective": {"kd": {"weight": 1.0, "temperature": 2.0}},
        "train": {"max_steps": 3, "batch_size": 16, "progress": False, "log_every": 1},
        "eval": {"every": None, "batch_size": 32},
        "output": {"dir": str(tmp_path / "runs")},
    }
    return load_config(spec, [f"teacher.members={MEMBERS}", *over])


def test_bad_recipes_name_the_setting_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"at least two teacher.members \(got 1\)"):
        load_config("digits", ["teacher.source=routed", "teacher.field=x",
                               "teacher.routes={a: 0}", "teacher.members=[{builder: mlp}]"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"teacher.routes\['a'\]='nobody' names no member"):
        _recipe(tmp_path, "teacher.routes={a: nobody}")
    with pytest.raises(ConfigError, match="route_by=field needs teacher.field"):
        _recipe(tmp_path, "teacher.field=null")
    with pytest.raises(ConfigError, match="teacher.default is for route_by: field"):
        _recipe(tmp_path, "teacher.route_by=confidence", "teacher.field=null",
                "teacher.routes={}")  # fmt: skip
    cfg = _recipe(tmp_path, "teacher.field=domain")
    with pytest.raises(ValueError, match=r"no field 'domain' \(they have index, inputs, labels\)"):
        Assembly(cfg).teacher_source()
    cfg = _recipe(tmp_path, "teacher.default=null")  # labels 2 and 3 have no route
    with pytest.raises(ValueError, match="no route for labels='2', '3'"):
        Assembly(cfg).teacher_source()  # refused before training, for the whole data set


def test_routed_recipe_trains_end_to_end_and_reports_the_split(tmp_path, capsys):
    cfg = _recipe(tmp_path)
    asm = Assembly(cfg)
    src = asm.teacher_source()
    assert "routed teacher: member 0: " in capsys.readouterr().err
    batch = asm.collate([asm.data.train[i] for i in range(16)])
    out = src(batch)
    want = (batch["labels"] >= 2).long()
    assert torch.equal(out.features[ROUTE_FEATURE], want)
    with torch.no_grad():
        m0, m1 = (t.module(batch["inputs"]) for t in src.teachers)
    torch.testing.assert_close(out.logits, torch.where(want[:, None].bool(), m1, m0))
    assert asm.source_class.plan_parameters(asm) == sum(
        p.numel() for t in src.teachers for p in t.module.parameters()
    )
    res = distill(cfg, quiet=True)
    assert (res.run_dir / "student").exists()
    conf = distill(_recipe(tmp_path, "teacher.route_by=confidence", "teacher.field=null",
                           "teacher.routes={}", "teacher.default=null",
                           f"output.dir={tmp_path}/conf"), quiet=True)  # fmt: skip
    assert (conf.run_dir / "student").exists()


def test_routed_cache_round_trip_and_routing_in_provenance(tmp_path):
    cfg = _recipe(tmp_path)
    s = CacheSettings(top_k=4, dtype="fp32", rows_per_shard=32)
    m = cache_recipe(cfg, tmp_path / "c", s, progress=False)
    spec = read_manifest(tmp_path / "c")["teacher"]["spec"]
    assert spec["source"] == "routed"
    assert spec["routing"]["routes"] == {"0": 0, "1": 0} and spec["routing"]["default"] == 1
    assert m["teacher"]["parameters"] > 0
    # the cached signal of each example is its routed member's
    asm = Assembly(cfg)
    src = asm.teacher_source()
    data = asm.data.train
    batch = asm.collate([data[i] for i in range(len(data))])
    ref = TopK.from_logits(src(batch).logits, 4)
    got = open_store(tmp_path / "c").batch(batch["index"].tolist())
    assert torch.equal(got.indices, ref.indices)
    torch.testing.assert_close(got.logprobs, ref.logprobs)
    # another routing spec is another cache
    with pytest.raises(CacheError, match=r"other settings or inputs.*routing.*default"):
        cache_recipe(_recipe(tmp_path, "teacher.default=0"), tmp_path / "c", s, progress=False)
    # the cache trains a recipe (same data) with source: cache
    res = distill(_recipe(tmp_path, "teacher={source: cache, cache: " + str(tmp_path / "c") + "}",
                          f"output.dir={tmp_path}/from-cache"), quiet=True)  # fmt: skip
    assert (res.run_dir / "student").exists()


# ----------------------------------------------------------------------------- prompts + LMs


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    """Saved random 2-layer Llamas with one word-level tokenizer (the third has a larger vocab)."""
    return [
        save_tiny_llama(tmp_path_factory.mktemp(f"lm{seed}"), seed, extra)
        for seed, extra in ((0, 0), (1, 0), (2, 8))
    ]


@pytest.fixture
def domain_file(tmp_path):
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(12):
        words = torch.randint(0, N_WORDS, (int(torch.randint(2, 6, (1,), generator=g)),),
                              generator=g).tolist()  # fmt: skip
        rows.append({"prompt": " ".join(f"w{i}" for i in words), "completion": "w1 w2 w3",
                     "domain": "code" if i % 3 == 0 else "news"})  # fmt: skip
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_prompts_pass_a_jsonl_field_through_to_items_and_batches(lm_dirs, domain_file, tmp_path):
    b = build_data("prompts", {"path": str(domain_file), "fields": ["domain"]}, 0.25, 0,
                   tokenizer=str(lm_dirs[0]))  # fmt: skip
    rows = [json.loads(x) for x in domain_file.read_text().splitlines()]
    items = [b.train[i] for i in range(len(b.train))]
    assert all(it["domain"] == rows[int(it["index"])]["domain"] for it in items)
    batch = b.collate(items[:4])
    assert batch["domain"] == [it["domain"] for it in items[:4]]
    plain = build_data("prompts", {"path": str(domain_file)}, 0.25, 0, tokenizer=str(lm_dirs[0]))
    assert "domain" not in plain.collate([plain.train[0]])  # only named fields travel
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w1", "domain": "news"}\n{"prompt": "w2"}\n')
    with pytest.raises(ValueError, match=r'bad.jsonl:2: the object has no "domain" field'):
        build_data("prompts", {"path": str(bad), "fields": ["domain"]}, 0.5, 0,
                   tokenizer=str(lm_dirs[0]))  # fmt: skip
    with pytest.raises(ValueError, match="needs data.params.path to a .jsonl file"):
        build_data("prompts", {"corpus": "bbc_news", "fields": ["domain"]}, 0.5, 0,
                   tokenizer=str(lm_dirs[0]))  # fmt: skip
    with pytest.raises(ValueError, match="'input_ids' is read already or is a batch key"):
        build_data("prompts", {"path": str(domain_file), "fields": ["input_ids"]}, 0.5, 0,
                   tokenizer=str(lm_dirs[0]))  # fmt: skip


def _lm_recipe(lm_dirs, data_path, tmp_path, *over):
    members = [{"builder": "hf_causal_lm", "params": {"model": str(d)}} for d in lm_dirs[:2]]
    spec = {
        "name": "routed-lm",
        "teacher": {
            "source": "routed",
            "field": "domain",
            "routes": {"news": "n", "code": "c"},
            "names": ["n", "c"],
            "members": members,
        },  # fmt: skip
        "student": {"builder": "hf_causal_lm", "params": {"model": str(lm_dirs[0])}},
        "data": {
            "source": "prompts",
            "params": {"path": str(data_path), "fields": ["domain"]},
            "val_fraction": 0.25,
        },  # fmt: skip
        "objective": {"fkl": {"loss": "forward_kl"}},
        "train": {"max_steps": 2, "batch_size": 4, "progress": False, "log_every": 1},
        "eval": {"batch_size": 4},
        "output": {"dir": str(tmp_path / "runs" / "lm")},
    }
    return load_config(spec, list(over))


def test_routed_causal_lm_teachers_on_prompt_data(lm_dirs, domain_file, tmp_path, capsys):
    cfg = _lm_recipe(lm_dirs, domain_file, tmp_path)
    asm = Assembly(cfg)
    src = asm.teacher_source()
    assert "routed teacher: n: " in capsys.readouterr().err
    batch = asm.collate([asm.data.train[i] for i in range(6)])
    out = src(batch)
    want = [1 if d == "code" else 0 for d in batch["domain"]]
    assert out.features[ROUTE_FEATURE].tolist() == want and 0 < sum(want) < 6
    full = [t(batch).logits for t in src.teachers]  # every member on the whole batch
    mask = batch["attention_mask"].bool()
    for i, m in enumerate(want):
        torch.testing.assert_close(out.logits[i][mask[i]], full[m][i][mask[i]],
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
    res = distill(cfg, quiet=True)
    assert (res.run_dir / "student").exists()
    # confidence routing decides per sequence, on the completion tokens
    conf = _lm_recipe(lm_dirs, domain_file, tmp_path, "teacher.route_by=confidence",
                      "teacher.field=null", "teacher.routes={}")  # fmt: skip
    csrc = Assembly(conf).teacher_source()
    route = csrc(batch).features[ROUTE_FEATURE]
    scores = torch.stack([csrc._confidence(z.float(), batch) for z in full])
    assert torch.equal(route, scores.argmax(0))
    # members with different vocabularies are refused before anything runs
    bad = _lm_recipe(lm_dirs, domain_file, tmp_path, "teacher.members=[{builder: hf_causal_lm, "
                     f"params: {{model: {lm_dirs[0]}}}}}, {{builder: hf_causal_lm, params: "
                     f"{{model: {lm_dirs[2]}}}}}]")  # fmt: skip
    with pytest.raises(ValueError, match=r"teacher.members: c gives 51 .* n gives 43"):
        Assembly(bad).teacher_source()

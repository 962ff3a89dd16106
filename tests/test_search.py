"""`mentor search`: the grid, DisWOT, short KD, Pareto fronts, Spearman, --confirm, --teachers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from mentor.assembly import Assembly, distill
from mentor.cli import main
from mentor.config import ConfigError, load_config
from mentor.search import (
    _check_proxies,
    _child,
    calibration_batches,
    default_grid,
    distil_candidate,
    diswot_score,
    expand_grid,
    gram,
    make_candidates,
    pareto_front,
    parse_grid,
    ranks,
    search,
    spearman,
)

FAST = ["teacher.fit.epochs=2", "train.progress=false"]


@pytest.fixture(autouse=True)
def _fast(one_thread, monkeypatch, tmp_path_factory):
    # one fitted-teacher cache for the module: the digits teacher is fitted once
    monkeypatch.setenv("MENTOR_CACHE", str(tmp_path_factory.getbasetemp() / "search-cache"))
    monkeypatch.delenv("MENTOR_DEBUG", raising=False)


# ----------------------------------------------------------------------------- the grid


def test_grid_is_the_cartesian_product_in_order():
    grid = parse_grid(
        ["student.params.hidden=[[8],[16],[32,32]]", "student.params.dropout=0.0,0.1"]
    )
    assert grid == [("student.params.hidden", [[8], [16], [32, 32]]),
                    ("student.params.dropout", [0.0, 0.1])]  # fmt: skip
    got = expand_grid(grid)
    assert len(got) == 6
    assert got[0] == {"student.params.hidden": [8], "student.params.dropout": 0.0}
    assert got[1] == {"student.params.hidden": [8], "student.params.dropout": 0.1}
    assert got[-1] == {"student.params.hidden": [32, 32], "student.params.dropout": 0.1}
    assert parse_grid(["student.params.hidden=32"]) == [("student.params.hidden", [32])]
    assert expand_grid([]) == [{}]


def test_candidates_are_validated_configs():
    cands = make_candidates("digits", FAST, parse_grid(["student.params.hidden=[[8],[64,64]]"]))
    assert [c.cfg.student.params["hidden"] for c in cands] == [[8], [64, 64]]
    assert cands[1].overrides == ["student.params.hidden=[64, 64]"]
    assert cands[1].label == "hidden=[64, 64]"
    assert all(c.cfg.teacher.fit.epochs == 2 for c in cands)


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("student.params.hiden=[[8]]", "student.params.hiden"),  # the builder's parameters
        ("train.lrr=[0.1]", "train.lrr"),  # the config's own error
        ("student.params.hidden=[]", "student.params.hidden"),  # empty list
        ("data.params.n=[1,2]", "data.params.n"),
        ("teacher.fit.epochs=[1,2]", "--teachers"),
    ],
)
def test_grid_errors_name_the_setting(spec, named):
    with pytest.raises((ConfigError, ValueError), match=named.replace(".", r"\.")):
        make_candidates("digits", FAST, parse_grid([spec]))


def test_layer_drop_grid_clears_the_recipes_layer_list():
    cands = make_candidates("tiny-classifier", [], parse_grid(["student.params.num_layers=1,2"]))
    assert [c.cfg.student.params for c in cands] == [
        {"layers": None, "num_layers": 1},
        {"layers": None, "num_layers": 2},
    ]
    assert cands[0].implied == ["student.params.layers=null"]


def test_default_grids_per_builder():
    g = default_grid(load_config("digits"))
    assert g[0][0] == "student.params.hidden" and len(g[0][1]) == 8 and [64, 64] in g[0][1]
    prune = load_config("digits", ["student.builder=prune", "student.params={}"])
    assert default_grid(prune) == [("student.params.sparsity", [0.3, 0.5, 0.7, 0.9])]
    assert default_grid(load_config("vision"))[0][0] == "student.params.channels"
    with pytest.raises(ValueError, match="no default grid for student.builder='hf_causal_lm'"):
        default_grid(load_config("causal-lm-pruned", ["student.builder=hf_causal_lm"]))


# ----------------------------------------------------------------------------- DisWOT


def _batches(n=3, b=16, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"inputs": torch.randn(b, d, generator=g)} for _ in range(n)]


def test_gram_rows_are_unit_vectors():
    g = gram(torch.randn(7, 5))
    assert g.shape == (7, 7)
    assert torch.allclose(g.norm(dim=1), torch.ones(7, dtype=g.dtype))
    orthogonal = torch.diag(torch.tensor([1.0, 2.0, 3.0]))  # rows uncorrelated: G = I
    assert torch.equal(gram(orthogonal), torch.eye(3, dtype=torch.float64))


def test_diswot_is_zero_for_the_teacher_itself_and_lower_for_others():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                            nn.Linear(32, 4))  # fmt: skip
    batches = _batches()
    same = diswot_score(teacher, copy.deepcopy(teacher), batches)
    assert same["score"] == 0.0 and same["semantic"] == 0.0 and same["relation"] == 0.0
    assert same["relation_logits"] == 0.0
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    d = diswot_score(teacher, other, batches)
    assert d["score"] < 0 and d["relation"] < 0 and d["semantic"] < 0
    assert d["score"] == pytest.approx(d["semantic"] + d["relation"])
    # by hand, the relation part on the first batch's penultimate features
    with torch.no_grad():
        x = batches[0]["inputs"]
        ft, fs = teacher[:4](x), other[:2](x)
    one = float(torch.linalg.matrix_norm(gram(ft) - gram(fs)))
    per = diswot_score(teacher, other, batches[:1])
    assert per["relation"] == pytest.approx(-one)


def test_diswot_on_token_positions_of_a_causal_lm(tiny_lm):
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    same = diswot_score(tiny_lm, copy.deepcopy(tiny_lm), [batch], task="causal_lm")
    assert same["score"] == 0.0
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    small = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1)).eval()  # fmt: skip
    assert diswot_score(tiny_lm, small, [batch], task="causal_lm")["score"] < 0


def test_proxy_errors_say_which_proxies_work():
    with pytest.raises(ValueError, match="--proxy short_kd"):
        _check_proxies("diswot", "embedding")
    with pytest.raises(ValueError, match="embedding"):
        _check_proxies("both", "embedding")
    assert _check_proxies("short_kd", "embedding") == ("short_kd",)
    assert _check_proxies("both", "classification") == ("diswot", "short_kd")
    with pytest.raises(ValueError, match="--proxy 'fast'"):
        _check_proxies("fast", "classification")


def test_calibration_batches_are_disjoint_and_seeded():
    cfg = load_config("digits", FAST)
    asm = Assembly(cfg)
    a = calibration_batches(asm.data.train, asm.collate, 3, 32, seed=0)
    b = calibration_batches(asm.data.train, asm.collate, 3, 32, seed=0)
    ids = torch.cat([x["index"] for x in a])
    assert len(set(ids.tolist())) == 96
    assert torch.equal(ids, torch.cat([x["index"] for x in b]))


# ----------------------------------------------------------------------------- statistics


def test_pareto_front_on_a_hand_made_set():
    score = [0.9, 0.8, 0.95, 0.7, 0.8, None]
    cost = [10, 5, 20, 5, 12, 1]
    # 1 dominates 3 (same cost, higher score); 0 and 1 dominate 4; 5 has no score
    assert pareto_front(score, cost) == [1, 0, 2]
    assert pareto_front([1.0, 1.0], [3, 3]) == [0, 1]  # equal points dominate neither


def test_spearman_on_hand_made_ranks():
    assert ranks([10, 30, 20, 20]) == [1, 4, 2.5, 2.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # d = rank differences (0, 2, -1, -1): 1 - 6*6 / (4*15) = 0.4
    assert spearman([1, 2, 3, 4], [1, 4, 2, 3]) == pytest.approx(0.4)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    stats = pytest.importorskip("scipy.stats")
    a, b = [0.3, 0.1, 0.9, 0.9, 0.5], [2.0, 1.0, 3.0, 5.0, 5.0]
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)


# ----------------------------------------------------------------------------- short KD, search


def test_short_kd_matches_an_independent_distillation(tmp_path):
    over = [*FAST, "student.params.hidden=[32]"]
    cfg = load_config("digits", over)
    got = distil_candidate(_child(Assembly(cfg), cfg), 6)
    assert got["steps"] == 6 and got["metric"] == "accuracy"
    ref = distill(load_config("digits", [*over, "train.max_steps=6",
                                         f"output.dir={tmp_path}/run"]), quiet=True)  # fmt: skip
    assert got["score"] == ref.metrics["student_accuracy"]


def test_search_confirm_and_teachers(tmp_path):
    out = tmp_path / "s"
    over = [*FAST, "train.max_steps=8"]
    res = search("digits", over, grid=["student.params.hidden=4,32,64"], proxy_steps=3,
                 confirm=3, teachers=["teacher.fit.epochs=1"], out=out, seeds=2,
                 n_batches=2)  # fmt: skip
    rows = res["candidates"]
    assert [r["label"] for r in rows] == ["hidden=4", "hidden=32", "hidden=64"]
    assert sorted(r["rank"] for r in rows) == [1, 2, 3]
    best = min(rows, key=lambda r: r["rank"])
    assert best["short_kd"]["score"] == max(r["short_kd"]["score"] for r in rows)
    assert [r["params"] for r in rows] == [64 * 4 + 4 + 4 * 10 + 10, 64 * 32 + 32 + 330,
                                           64 * 64 + 64 + 650]  # fmt: skip
    assert all(r["diswot"]["seeds"] == 2 and r["diswot"]["score"] < 0 for r in rows)
    assert all(r["latency_ms"] > 0 and r["short_kd"]["steps"] == 3 for r in rows)
    # confirmed: every candidate trained for the recipe's 8 steps; the same as a short KD of 8
    c = res["confirm"]
    assert sorted(c["candidates"]) == [0, 1, 2]
    cfg = load_config("digits", [*over, "student.params.hidden=32"])
    again = distil_candidate(_child(Assembly(cfg), cfg), 8)
    assert rows[1]["confirmed"]["score"] == again["score"]
    final = [rows[i]["confirmed"]["score"] for i in c["candidates"]]
    for p in ("diswot", "short_kd"):
        assert c["spearman"][p] == spearman([rows[i][p]["score"] for i in c["candidates"]], final)
        assert 0 < c["cost_ratio"][p]["search"]
    # capacity gap: the recipe's teacher and one variant, for the best candidate
    t = res["teachers"]
    assert t["student"] == best["label"]
    assert [v["teacher"] for v in t["variants"]] == ["(recipe)", "teacher.fit.epochs=1"]
    assert t["variants"][0]["student"] == best["short_kd"]
    scores = [v["student"]["score"] for v in t["variants"]]
    assert t["best"] == scores.index(max(scores))
    assert all(0 < v["teacher_quality"] <= 1 for v in t["variants"])
    # outputs
    saved = json.loads((out / "search.json").read_text())
    assert saved["candidates"][0]["overrides"] == ["student.params.hidden=4"]
    md = (out / "search.md").read_text()
    assert "Pareto front" in md and "Spearman" in md and "Capacity gap" in md
    assert (out / "search.png").stat().st_size > 1000
    assert sorted(p.name for p in out.iterdir()) == ["search.json", "search.md", "search.png"]
    # an existing --out is refused unless --overwrite; --confirm beyond the grid is refused
    with pytest.raises(FileExistsError, match="--overwrite"):
        search("digits", over, grid=["student.params.hidden=4"], out=out)
    with pytest.raises(ValueError, match="--confirm 2 is more than the 1 candidates"):
        search("digits", over, grid=["student.params.hidden=4"], confirm=2, out=tmp_path / "x")
    with pytest.raises(ValueError, match="'train.lr=1' is not a teacher"):
        search("digits", over, teachers=["train.lr=1"], out=tmp_path / "y")


def test_cli_search_diswot_only(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["search", "digits", "--grid", "student.params.hidden=8,16", "--proxy", "diswot",
            "--seeds", "1", "--out", str(out), *FAST]  # fmt: skip
    assert main(args) == 0
    res = json.loads((out / "search.json").read_text())
    assert res["proxies"] == ["diswot"] and res["rank_by"] == "diswot"
    assert "short_kd" not in res["candidates"][0]
    assert "mentor search digits" in capsys.readouterr().out
    assert main(args) == 2  # not empty now
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main(["search", "digits", "--grid", "student.params.hidden=", *FAST]) == 2
    assert "student.params.hidden: the list of values is empty" in capsys.readouterr().err

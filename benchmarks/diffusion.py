"""Few-step diffusion students: sample quality vs NFE for every few-step objective, 3 seeds.

Issue #18. The two diffusion recipes, each objective distilled with the same budget:

* ``diffusion-2d`` (ring of 8 Gaussians, MLP denoisers): every registered objective —
  ``consistency_distillation``, ``consistency_training`` (iCT, the student from scratch: no
  teacher at all, plus the same from the teacher's weights), ``dmd2``, ``progressive``,
  ``embedding_mmd``, ``hyper_sd_tscd`` — 1,500 steps as the recipe ships, seeds 0, 1, 2; a
  teacher is fitted per seed (the fitted-teacher cache keeps it for every arm of that seed).
  Metrics: unbiased MMD and mode coverage against fresh draws of the mixture.
* ``diffusion-digits`` (8×8 digits, small UNets): ``consistency_distillation``,
  ``consistency_training`` (from scratch) and ``dmd2``, at 800 consistency steps (the recipe:
  1,000) and 240 DMD2 steps (0.3× — the recipe's equal-time ratio, 300 vs 1,000), seeds 0, 1, 2
  with **one** teacher (fitted with seed 0) shared by all seeds through ``teacher.path``.
  Metrics: Fréchet distance and precision/recall in the penultimate features of a small
  classifier (classifier-feature FD: no Inception weights offline), one classifier (seed 0)
  for every run so that all FDs are comparable.

The teacher is evaluated at 1, 2, 4, 8 and 50 NFE and every student at 1, 2 and 4 NFE, with
the code ``mentor distill`` / ``mentor eval`` use (:func:`mentor.engine.diffusion.evaluate`:
the same initial noise per seed, ``train.seed`` + 7919). Runs are started from Python like
``mentor distill`` (:func:`mentor.assembly.distill`). The per-objective overrides are the
:data:`ARMS` table below: the recipes' tuned ``diffusion.params`` blocks
(``consistency_distillation``, ``dmd2``) as shipped, every other objective at its defaults
except run-length settings.
At the end, with nothing else running, the 1-step students and the 50-step teacher are timed
on one CPU thread (the recipes' evaluation setting): the wall-clock sampling speed-up.

Runs go to 2 worker processes (``--jobs``; every run uses one torch thread, as the recipes do),
longest first; each arm's train/eval time is printed as it finishes.

**Estimated full run: about 15 min on 2 idle cores with ``--jobs 2`` (about 27 min with
``--jobs 1``).** Estimate from the recipes' own measured times (docs/diffusion.md, measured on
2 shared cores): 2-D teacher fit ~20 s × 3, 2-D arms ~15–40 s each (DMD2 ~2×, 21 arms in all),
digits teacher fit ~2.5 min + feature classifier ~20 s once, digits consistency ~0.12 s/step and
DMD2 ~0.4 s/step (9 runs, ~1.5 min each), ~5 s of evaluation per run, ~1 min of timing: ~27 min
of single-core work, split over two workers.

    .venv/bin/python -m benchmarks.diffusion [--quick] [--jobs 2] [--seeds 0 1 2]
                                             [--recipes 2d digits]

``--quick``: the recipes' smoke sizes (a few hundred points, tiny UNets, tens of steps), one
seed, in-process; outputs to results/quick/ (< 1 min).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import _common as C

NAME = "diffusion"

# The recipes, and the run length this benchmark gives them (``train.max_steps`` of the
# consistency-style arms; ``dmd2_steps`` for DMD2, which costs ~3× as much per step).
RECIPES: dict[str, dict[str, Any]] = {
    "2d": {"recipe": "diffusion-2d", "over": [], "steps": 1500, "dmd2_steps": 1500,
           "share_teacher": False, "metric": "mmd"},
    "digits": {"recipe": "diffusion-digits", "over": [], "steps": 800, "dmd2_steps": 240,
               "share_teacher": True, "metric": "fd"},
}  # fmt: skip

# The per-objective overrides (on top of the recipe; ``diffusion.objective`` and the run length
# are set for every arm). ``{steps}``, ``{dmd2_steps}`` and ``{quarter}`` (steps // 4) are filled
# in from RECIPES. Label -> (objective, overrides, why).
ARMS: dict[str, dict[str, tuple[str, list[str], str]]] = {
    "2d": {
        "consistency_distillation": ("consistency_distillation", [],
            "recipe block: CM's original CD setting (18 levels, EMA target 0.95, L2, uniform "
            "intervals); student from the teacher"),
        "consistency_training": ("consistency_training", ["student.params.init=fresh"],
            "iCT defaults (Pseudo-Huber, lognormal intervals, N 10→1280 over the run, no EMA); "
            "student from scratch: no teacher at all"),
        "consistency_training (teacher init)": ("consistency_training", [],
            "iCT defaults; student starts from the teacher's weights (the recipe's init), "
            "never queries it"),
        "dmd2": ("dmd2", ["train.max_steps={dmd2_steps}"],
            "recipe block: 2 fake-score updates per step, fake lr 1e-3; generator lr 1e-4"),
        "progressive": ("progressive",
            ["diffusion.params.progressive.student_steps=8",
             "diffusion.params.progressive.final_student_steps=1",
             "diffusion.params.progressive.iters_per_round={quarter}"],
            "8→4→2→1 DDIM steps, a quarter of the run per round (the engine's default, "
            "spelled out)"),
        "embedding_mmd": ("embedding_mmd", [],
            "defaults: 1-step generator, identity features, data as reference (no teacher "
            "queries); student from the teacher"),
        "hyper_sd_tscd": ("hyper_sd_tscd", [],
            "defaults: segments 8→4→2→1, a quarter of the run each, 50-step teacher grid"),
    },
    "digits": {
        "consistency_distillation": ("consistency_distillation", [],
            "recipe block: CM's original CD setting (18 levels, EMA target 0.95, L2)"),
        "consistency_training": ("consistency_training", ["student.params.init=fresh"],
            "iCT defaults; student from scratch: no teacher at all"),
        "dmd2": ("dmd2", ["train.lr=5e-5", "train.max_steps={dmd2_steps}"],
            "recipe comment: generator lr 5e-5, 0.3× the consistency steps (equal time); block: "
            "2 fake-score updates, fake lr 3e-4"),
    },
}  # fmt: skip
# Objectives that query the teacher during training (direction 3's "distillation range").
DISTILLING = ("consistency_distillation", "dmd2", "progressive", "hyper_sd_tscd")
METRICS = {"mmd": ("mmd", "coverage", "modes_covered", "high_quality"),
           "fd": ("fd", "precision", "recall")}  # fmt: skip
NFE_KEYS = ("diffusion.eval_teacher_steps", "diffusion.teacher_steps", "diffusion.student_steps")


def settings(quick: bool) -> dict[str, Any]:
    """Recipes with their overrides and run lengths, seeds, timing rounds."""
    rec = {k: dict(v) for k, v in RECIPES.items()}
    if not quick:
        return {"recipes": rec, "seeds": [0, 1, 2], "timing_rounds": 7}
    from mentor.recipes import SMOKE_DATA

    for v in rec.values():  # the smoke sizes, but every NFE of the real table
        v["over"] = [o for o in SMOKE_DATA[v["recipe"]] if not o.startswith(NFE_KEYS)]
    rec["2d"].update(steps=60, dmd2_steps=30)
    rec["2d"]["over"] = [o.replace("teacher.fit.epochs=150", "teacher.fit.epochs=100")
                         for o in rec["2d"]["over"]]  # fmt: skip
    rec["digits"].update(steps=4, dmd2_steps=2)
    return {"recipes": rec, "seeds": [0], "timing_rounds": 2}


def arm_overrides(rk: str, label: str, rec: dict[str, Any]) -> list[str]:
    """``diffusion.objective``, the run length and the arm's own overrides, filled in."""
    objective, over, _ = ARMS[rk][label]
    fill = {"steps": rec["steps"], "dmd2_steps": rec["dmd2_steps"],
            "quarter": max(1, rec["steps"] // 4)}  # fmt: skip
    return [f"diffusion.objective={objective}", f"train.max_steps={rec['steps']}",
            *(o.format(**fill) for o in over)]  # fmt: skip


# ----------------------------------------------------------------------------- jobs (workers)
# A job is ("prep" | "arm", spec); spec: recipe, over (all overrides), seed, out, teacher (a
# fitted teacher's folder, or None to fit / find it in the fitted-teacher cache).


def _config(spec: dict[str, Any], extra: tuple[str, ...] = ()) -> Any:
    from mentor.config import load_config

    teacher = [f"teacher.path={spec['teacher']}"] if spec.get("teacher") else []
    return load_config(spec["recipe"], [*spec["over"], f"train.seed={spec['seed']}",
                                        "train.progress=false", f"output.dir={spec['out']}",
                                        *teacher, *extra])  # fmt: skip


def _features(spec: dict[str, Any]) -> tuple[Callable | None, dict | None]:
    """The image metrics' features: one classifier for every run (fitted with seed 0 and kept
    in the fitted-teacher cache), so every FD of the benchmark is in the same features."""
    import torch
    from torch import nn

    from mentor.assembly import Assembly, diffusion_feature_net

    asm = Assembly(_config({**spec, "seed": 0, "teacher": None}))
    if len(asm.data.info.input_shape or ()) < 2:
        return None, None
    net, info = diffusion_feature_net(asm)
    body = nn.Sequential(*list(net)[:-1]).eval()

    def features(x: Any) -> Any:
        with torch.no_grad():
            return torch.cat([body(x[i : i + 512]) for i in range(0, len(x), 512)])

    return features, info


def _evaluate(
    spec: dict[str, Any], nfe_over: tuple[str, ...], student: Any, teacher: Any
) -> dict[str, Any]:
    """:func:`mentor.engine.diffusion.evaluate` (what ``mentor distill`` / ``mentor eval`` run)
    with the benchmark's shared feature classifier, without latency (timed apart at the end)."""
    from mentor.assembly import Assembly
    from mentor.engine.diffusion import (
        build_diffusion_objective,
        evaluate,
        make_schedule,
        torch_threads,
        total_steps,
    )

    cfg = _config(spec)
    bundle = Assembly(cfg).data
    objective = build_diffusion_objective(
        cfg.diffusion, make_schedule(cfg.diffusion), total_steps(cfg, len(bundle.train))
    )
    features, info = _features(spec)
    with torch_threads(cfg.diffusion, bundle.info):
        ev, _ = evaluate(student, teacher, objective, bundle, _config(spec, nfe_over),
                         features=features, feature_info=info, progress=False,
                         latency=False)  # fmt: skip
    return ev


def _prep(spec: dict[str, Any]) -> dict[str, Any]:
    """Fit (or load) the seed's teacher and score it at every NFE, with pure noise and the
    real-data floor (the student slot of ``evaluate`` is the teacher at 1 NFE, dropped)."""
    from mentor.assembly import Assembly, diffusion_parts

    out = Path(spec["out"])
    asm = Assembly(_config(spec))
    t0 = time.perf_counter()
    teacher, _ = diffusion_parts(asm)  # fitted, or found in the fitted-teacher cache
    fit_s = time.perf_counter() - t0
    folder = spec.get("teacher")
    if folder is None:
        out.mkdir(parents=True, exist_ok=True)
        asm.save_fitted_teachers(out)
        folder = str(out / "teacher")
    t1 = time.perf_counter()
    ev = _evaluate(spec, ("diffusion.student_steps=[1]",), teacher, teacher)
    return {"teacher_dir": folder, "fit_s": fit_s, "eval_s": time.perf_counter() - t1,
            "rows": [r for r in ev["rows"] if r["model"] in ("teacher", "noise")],
            "floor": ev["data_floor"], "feature_net": ev.get("feature_net"),
            "reference": ev.get("reference"), "means": ev.get("means")}  # fmt: skip


def _arm(spec: dict[str, Any]) -> dict[str, Any]:
    """Distil one student as ``mentor distill`` does, then score it at every student NFE."""
    from mentor.assembly import distill

    cfg = _config(spec)
    t0 = time.perf_counter()
    res = distill(cfg, quiet=True, final=False)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    nfe_over = ("diffusion.eval_teacher_steps=[1]", "diffusion.teacher_steps=1")
    ev = _evaluate(spec, nfe_over, res.student, res.teacher)
    log = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines() if x]
    train = [r for r in log if r.get("kind") == "train"]
    return {"rows": [r for r in ev["rows"] if r["model"] == "student"],
            "teacher_nfe1": next(r for r in ev["rows"] if r["model"] == "teacher"),
            "train_s": train_s, "eval_s": time.perf_counter() - t1,
            "steps": int(cfg.train.max_steps), "run_dir": str(res.run_dir),
            "diverged": any(bool(r.get("diverged")) for r in train),
            "final_loss": train[-1].get("loss") if train else None}  # fmt: skip


def _job(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One job (in a worker process or in-process); an error is returned, not raised."""
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = _prep(spec) if kind == "prep" else _arm(spec)
    except Exception as e:  # noqa: BLE001 - one failed arm must not lose the others
        tail = traceback.format_exc().strip().splitlines()[-4:]
        out = {"error": f"{type(e).__name__}: {e}", "traceback": tail}
    out["wall_s"] = time.perf_counter() - t0
    return out


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # two workers on two cores; the recipes evaluate on one thread


# ----------------------------------------------------------------------------- scheduling


def plan(st: dict[str, Any], recipes: list[str], work: Path) -> list[dict[str, Any]]:
    """Every job with its dependencies, longest first where it matters: the digits teacher,
    the 2-D teachers, the digits arms (DMD2 first), then the short 2-D arms."""
    jobs: list[dict[str, Any]] = []
    seeds = st["seeds"]

    def prep_id(rk: str, seed: int) -> str:
        shared = st["recipes"][rk]["share_teacher"]
        return f"prep/{rk}/{seeds[0] if shared else seed}"

    order = sorted(recipes, key=lambda r: r != "digits")  # the long digits teacher first
    for rk in order:
        rec = st["recipes"][rk]
        for seed in seeds:
            jid = f"prep/{rk}/{seed}"
            dep = [] if not rec["share_teacher"] or seed == seeds[0] else [prep_id(rk, seed)]
            jobs.append({"id": jid, "kind": "prep", "rk": rk, "seed": seed, "deps": dep,
                         "teacher_from": dep[0] if dep else None,
                         "spec": {"recipe": rec["recipe"], "over": rec["over"], "seed": seed,
                                  "out": str(work / f"{rk}-teacher-s{seed}")}})  # fmt: skip
    for rk in order:
        rec = st["recipes"][rk]
        labels = sorted(ARMS[rk], key=lambda lb: ARMS[rk][lb][0] != "dmd2")
        for seed in seeds:
            for label in labels:
                slug = label.replace(" ", "_").replace("(", "").replace(")", "")
                dep = prep_id(rk, seed)
                jobs.append({"id": f"arm/{rk}/{label}/{seed}", "kind": "arm", "rk": rk,
                             "seed": seed, "label": label, "deps": [dep],
                             "teacher_from": dep if rec["share_teacher"] else None,
                             "spec": {"recipe": rec["recipe"], "seed": seed,
                                      "over": [*rec["over"], *arm_overrides(rk, label, rec)],
                                      "out": str(work / f"{rk}-{slug}-s{seed}")}})  # fmt: skip
    # the digits arms before the 2-D arms, so the long runs are not left for the end
    jobs.sort(key=lambda j: (j["kind"] == "arm" and j["rk"] != "digits", j["kind"] == "arm"))
    return jobs


def _report(job: dict[str, Any], res: dict[str, Any], metric: str) -> None:
    tag = f"[{job['rk']} seed {job['seed']}]"
    if "error" in res:
        print(f"{tag} {job['id']} FAILED: {res['error']}", flush=True)
        return
    if job["kind"] == "prep":
        t = {r["nfe"]: r[metric] for r in res["rows"] if r["model"] == "teacher"}
        print(f"{tag} teacher ready in {res['fit_s']:.0f} s (eval {res['eval_s']:.0f} s): "
              + ", ".join(f"{metric} {v:.4g} @{k}" for k, v in sorted(t.items())),
              flush=True)  # fmt: skip
        return
    s = {r["nfe"]: r[metric] for r in res["rows"]}
    print(f"{tag} {job['label']}: train {res['train_s']:.0f} s ({res['steps']} steps), eval "
          f"{res['eval_s']:.0f} s: " + ", ".join(f"{metric} {v:.4g} @{k}" for k, v in
                                                  sorted(s.items())), flush=True)  # fmt: skip


def run_jobs(jobs: list[dict[str, Any]], n_workers: int, st: dict[str, Any]) -> dict[str, dict]:
    """Run the jobs (``n_workers`` > 1: a spawn process pool), each once its dependencies are
    done; a job whose dependency failed is skipped with an error."""
    results: dict[str, dict[str, Any]] = {}
    pending = list(jobs)

    def spec_of(job: dict[str, Any]) -> dict[str, Any] | None:
        src = job["teacher_from"]
        if src is not None and "teacher_dir" not in results[src]:
            return None
        return {**job["spec"], "teacher": results[src]["teacher_dir"] if src else None}

    def ready() -> dict[str, Any] | None:
        for job in pending:
            if all(d in results for d in job["deps"]):
                pending.remove(job)
                return job
        return None

    def finish(job: dict[str, Any], res: dict[str, Any]) -> None:
        results[job["id"]] = res
        _report(job, res, st["recipes"][job["rk"]]["metric"])

    if n_workers <= 1:
        while (job := ready()) is not None:
            spec = spec_of(job)
            finish(job, _job(job["kind"], spec) if spec else {"error": "its teacher failed"})
        return results
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from benchmarks import diffusion as me  # picklable by module name, also under -m

    running: dict[Any, dict[str, Any]] = {}
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=me._worker_init) as pool:
        while pending or running:
            while len(running) < n_workers and (job := ready()) is not None:
                spec = spec_of(job)
                if spec is None:
                    finish(job, {"error": "its teacher failed"})
                    continue
                running[pool.submit(me._job, job["kind"], spec)] = job
            if not running:
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                try:
                    res = fut.result()
                except Exception as e:  # noqa: BLE001 - a crashed worker
                    res = {"error": f"worker: {type(e).__name__}: {e}"}
                finish(job, res)
    return results


# ----------------------------------------------------------------------------- timing


def time_sampling(prep: dict[str, Any], arms: dict[str, dict[str, Any]], spec: dict[str, Any],
                  rounds: int) -> dict[str, Any]:  # fmt: skip
    """Wall-clock per sample, on one thread, of the teacher at ``teacher_steps`` and at 1 NFE
    and of every 1-step student (one seed), interleaved over ``rounds`` rounds after a warm-up
    each; the speed-up is the teacher's median over the student's (and its per-round range)."""
    import torch

    from mentor.diffusion.metrics import latency_per_sample
    from mentor.diffusion.samplers import sample
    from mentor.engine.diffusion import (
        build_diffusion_objective,
        make_schedule,
        student_sample,
        total_steps,
    )
    from mentor.students import load_model

    teacher, info = load_model(prep["teacher_dir"])
    teacher.eval()
    cfg = _config(spec)
    dcfg = cfg.diffusion
    sch = make_schedule(dcfg)
    shape1 = tuple(int(s) for s in info.input_shape or ())
    points = len(shape1) == 1
    n = 256 if points else 64
    shape = (n, *shape1)

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    def teacher_fn(k: int) -> Callable[[], Any]:
        return lambda: sample(teacher, sch, shape, k, method=dcfg.teacher_sampler,
                              generator=gen(), batch_size=n)  # fmt: skip

    fns: dict[str, Callable[[], Any]] = {
        f"teacher@{dcfg.teacher_steps}": teacher_fn(dcfg.teacher_steps),
        "teacher@1": teacher_fn(1),
    }
    for label, res in arms.items():
        acfg = _config({**spec, "over": res["over"]})
        student = load_model(Path(res["run_dir"]) / "student")[0].eval()
        obj = build_diffusion_objective(acfg.diffusion, sch, total_steps(acfg, 1))

        def fn(o: Any = obj, m: Any = student) -> Any:
            return student_sample(o, m, shape, 1, gen(), batch_size=n)

        fns[f"{label}@1"] = fn
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {k: [] for k in fns}
    try:
        with torch.no_grad():
            for f in fns.values():
                f()
            for _ in range(rounds):
                for k, f in fns.items():
                    times[k].append(1000 * latency_per_sample(f, n, repeats=3, warmup=0))
    finally:
        torch.set_num_threads(old)
    ref = times[f"teacher@{dcfg.teacher_steps}"]
    speedup = {}
    for label in arms:
        s = times[f"{label}@1"]
        per = [a / b for a, b in zip(ref, s)]
        speedup[label] = {"median": statistics.median(ref) / statistics.median(s),
                          "min": min(per), "max": max(per)}  # fmt: skip
    return {"threads": 1, "samples_per_call": n, "rounds": rounds, "seed": spec["seed"],
            "teacher_steps": dcfg.teacher_steps,
            "latency_ms": {k: C.summarize(v) for k, v in times.items()},
            "speedup": speedup}  # fmt: skip


# ----------------------------------------------------------------------------- aggregation


def _ms(xs: list[float]) -> dict[str, Any]:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "n": len(xs), "values": xs}  # fmt: skip


def _agg(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: _ms([float(r[k]) for r in rows]) for k in keys}


def summarize_recipe(rk: str, st: dict[str, Any], jobs: list[dict[str, Any]],
                     results: dict[str, dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """Mean ± std over seeds of every (model, NFE) and metric; fit/train times; errors."""
    rec = st["recipes"][rk]
    keys = METRICS[rec["metric"]]
    preps = {j["seed"]: results[j["id"]] for j in jobs if j["kind"] == "prep" and j["rk"] == rk}
    ok = {s: p for s, p in preps.items() if "error" not in p}
    out: dict[str, Any] = {"recipe": rec["recipe"], "metric": rec["metric"],
                           "steps": rec["steps"], "dmd2_steps": rec["dmd2_steps"],
                           "over": rec["over"], "share_teacher": rec["share_teacher"],
                           "errors": {f"teacher seed {s}": p["error"] for s, p in preps.items()
                                      if "error" in p}}  # fmt: skip
    if not ok:
        return out
    first = ok[min(ok)]
    nfes = sorted({r["nfe"] for r in first["rows"] if r["model"] == "teacher"})
    out["teacher"] = {
        str(k): _agg([next(r for r in p["rows"] if r["model"] == "teacher" and r["nfe"] == k)
                      for p in ok.values()], keys)
        for k in nfes
    }  # fmt: skip
    out["noise"] = _agg([next(r for r in p["rows"] if r["model"] == "noise") for p in ok.values()],
                        keys)  # fmt: skip
    out["floor"] = _agg([p["floor"] for p in ok.values()], keys)
    out["teacher_fit_s"] = {str(s): p["fit_s"] for s, p in ok.items()}
    out["feature_net"] = first.get("feature_net")
    out["reference"] = first.get("reference")
    if first.get("means"):
        out["modes"] = len(first["means"])
    out["arms"] = {}
    for label, (objective, _, why) in ARMS[rk].items():
        runs = {j["seed"]: results.get(j["id"], {"error": "not run"}) for j in jobs
                if j["kind"] == "arm" and j["rk"] == rk and j.get("label") == label}  # fmt: skip
        if not runs:
            continue
        good = {s: r for s, r in runs.items() if "error" not in r}
        a: dict[str, Any] = {
            "objective": objective, "why": why,
            "over": [o for o in arm_overrides(rk, label, rec) if not o.startswith(
                ("diffusion.objective=", f"train.max_steps={rec['steps']}"))],
            "errors": {str(s): r["error"] for s, r in runs.items() if "error" in r},
            "seeds": sorted(good),
        }  # fmt: skip
        if good:
            snfe = sorted({r["nfe"] for r in next(iter(good.values()))["rows"]})
            a["nfe"] = {str(k): _agg([next(x for x in r["rows"] if x["nfe"] == k)
                                      for r in good.values()], keys) for k in snfe}  # fmt: skip
            a["per_seed"] = {str(s): {str(x["nfe"]): x[rec["metric"]] for x in r["rows"]}
                             for s, r in good.items()}  # fmt: skip
            a["train_s"] = _ms([r["train_s"] for r in good.values()])
            a["eval_s"] = _ms([r["eval_s"] for r in good.values()])
            a["steps"] = next(iter(good.values()))["steps"]
            a["diverged_seeds"] = [s for s, r in good.items() if r["diverged"]]
            # the teacher's 1-NFE row of every arm must equal its seed's teacher table
            t1 = {s: next(x for x in ok[s]["rows"] if x["model"] == "teacher" and x["nfe"] == 1)
                  for s in good if s in ok}  # fmt: skip
            a["teacher_rows_match"] = all(
                abs(good[s]["teacher_nfe1"][rec["metric"]] - t1[s][rec["metric"]])
                <= 1e-6 * max(1.0, abs(t1[s][rec["metric"]]))
                for s in t1
            )
        out["arms"][label] = a
    return out


APPROACH = 2.0  # "approaches the 50-step teacher": the best 1-4 NFE student within 2x its metric


def directions(s: dict[str, Any], teacher_steps: int) -> dict[str, Any]:
    """The three paper directions, computed from the means (lower MMD / FD is better)."""
    m = s["metric"]
    if "teacher" not in s:
        return {}
    T = {int(k): v[m]["mean"] for k, v in s["teacher"].items()}
    t_ref = T[teacher_steps]
    arms = {lb: a for lb, a in s["arms"].items() if "nfe" in a}
    d1 = []
    for lb, a in arms.items():
        S = {int(k): v[m]["mean"] for k, v in a["nfe"].items()}
        best = min(S, key=lambda k: S[k])
        factor = S[best] / t_ref if t_ref > 0 else None
        d1.append({"arm": lb, "beats_teacher_at": [k for k in sorted(S) if k in T and S[k] < T[k]],
                   "best_nfe": best, "best": S[best], "teacher_same_nfe": T.get(best),
                   "factor_vs_teacher": factor,
                   "approaches": factor is not None and factor <= APPROACH})  # fmt: skip
    both = [x["arm"] for x in d1 if x["approaches"] and x["best_nfe"] in x["beats_teacher_at"]]
    out: dict[str, Any] = {"teacher_ref": t_ref, "approach_factor": APPROACH,
                           "d1": {"arms": d1, "holds_for": both, "holds": bool(both)}}  # fmt: skip
    by_obj = {a["objective"]: lb for lb, a in arms.items()}
    cd, dmd = by_obj.get("consistency_distillation"), by_obj.get("dmd2")
    sec = "coverage" if m == "mmd" else "recall"
    if cd and dmd:
        seeds = sorted(set(arms[cd]["per_seed"]) & set(arms[dmd]["per_seed"]))
        diffs = [arms[dmd]["per_seed"][x]["1"] - arms[cd]["per_seed"][x]["1"] for x in seeds]
        d = _ms(diffs)
        out["d2"] = {"dmd2": arms[dmd]["nfe"]["1"][m]["mean"],
                     "cd": arms[cd]["nfe"]["1"][m]["mean"], "diff": d, "holds": d["mean"] <= 0,
                     "within_spread": len(diffs) > 1 and abs(d["mean"]) <= d["std"],
                     "secondary": sec, "dmd2_secondary": arms[dmd]["nfe"]["1"][sec]["mean"],
                     "cd_secondary": arms[cd]["nfe"]["1"][sec]["mean"]}  # fmt: skip
    ct = "consistency_training" if "consistency_training" in arms else None
    dist = {lb: a["nfe"]["1"][m]["mean"] for lb, a in arms.items() if a["objective"] in DISTILLING}
    if ct and dist:
        v = arms[ct]["nfe"]["1"][m]["mean"]
        lo, hi = min(dist.values()), max(dist.values())
        out["d3"] = {"ct": v, "range": [lo, hi], "arms": dist, "holds": v <= hi,
                     "position": ("below (better than)" if v < lo else "within" if v <= hi
                                  else "above (worse than)") + " the range"}  # fmt: skip
        ti = "consistency_training (teacher init)"
        if ti in arms:
            out["d3"]["ct_teacher_init"] = arms[ti]["nfe"]["1"][m]["mean"]
    return out


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Fit the teachers, distil every arm × seed, time the samplers; JSON, plot, docs section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke sizes, one seed (results/quick)")
    ap.add_argument("--seeds", type=int, nargs="*", default=None)
    ap.add_argument("--recipes", nargs="*", choices=list(RECIPES), default=list(RECIPES))
    ap.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes (default 2; 1 with --quick: in-process)",
    )
    a = ap.parse_args(argv)
    if a.quick:
        C.use_quick_outputs()
    st = settings(a.quick)
    if a.seeds:
        st["seeds"] = a.seeds
    n_workers = a.jobs if a.jobs is not None else (1 if a.quick else 2)
    t0 = time.perf_counter()
    load_before = C.load_avg()
    print(f"{NAME}: {', '.join(a.recipes)}, seeds {st['seeds']}, {n_workers} worker(s)",
          flush=True)  # fmt: skip
    summary: dict[str, Any] = {}
    timing: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mentor-bench-diffusion-") as tmp:
        work = Path(tmp)
        jobs = plan(st, a.recipes, work)
        results = run_jobs(jobs, n_workers, st)
        jobs_s = time.perf_counter() - t0
        for rk in a.recipes:
            summary[rk] = summarize_recipe(rk, st, jobs, results)
            rec, seed = st["recipes"][rk], st["seeds"][0]
            prep = results.get(f"prep/{rk}/{seed}", {})
            arms = {j["label"]: {"run_dir": results[j["id"]]["run_dir"], "over": j["spec"]["over"]}
                    for j in jobs if j["kind"] == "arm" and j["rk"] == rk and j["seed"] == seed
                    and "error" not in results.get(j["id"], {"error": 1})}  # fmt: skip
            if "teacher_dir" in prep and arms:
                spec = {"recipe": rec["recipe"], "over": rec["over"], "seed": seed,
                        "out": str(work / "timing"), "teacher": None}  # fmt: skip
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    timing[rk] = time_sampling(prep, arms, spec, st["timing_rounds"])
                sp = timing[rk]["speedup"]
                print(f"[{rk}] 1-step student vs {timing[rk]['teacher_steps']}-step teacher: "
                      + ", ".join(f"{lb} {v['median']:.1f}x" for lb, v in sp.items()),
                      flush=True)  # fmt: skip
    from mentor.config import load_config

    for rk in a.recipes:
        ts = load_config(st["recipes"][rk]["recipe"], []).diffusion.teacher_steps
        summary[rk]["teacher_steps"] = ts
        summary[rk]["directions"] = directions(summary[rk], ts)
        summary[rk]["timing"] = timing.get(rk)
    payload = {
        "machine": C.machine_info(), "load": C.load_record(load_before, C.load_avg()),
        "load_note": C.load_span_note(load_before, C.load_avg()), "quick": a.quick,
        "seeds": st["seeds"], "workers": n_workers, "recipes": summary,
        "arms_table": {rk: {lb: {"objective": o, "overrides": ov, "why": w}
                            for lb, (o, ov, w) in ARMS[rk].items()} for rk in a.recipes},
        "jobs": {j["id"]: {k: v for k, v in results.get(j["id"], {}).items()
                           if k in ("wall_s", "train_s", "eval_s", "fit_s", "error", "traceback",
                                    "diverged", "final_loss")} for j in jobs},
        "jobs_s": jobs_s, "total_s": time.perf_counter() - t0,
    }  # fmt: skip
    C.publish(NAME, payload, markdown, lambda path: plot(payload, path))
    return payload


# ----------------------------------------------------------------------------- docs


def _f(ms: dict[str, Any] | None, digits: int) -> str:
    if not ms:
        return "–"
    if ms["n"] > 1:
        return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"
    return f"{ms['mean']:.{digits}f}"


def _nfe_table(s: dict[str, Any]) -> list[str]:
    """The NFE table of one recipe: teacher, every student, pure noise, the real-data floor."""
    points = s["metric"] == "mmd"
    if points:
        head = [f"| model | NFE | MMD ↓ | modes covered (of {s.get('modes', 8)}) ↑ | "
                "high-quality share ↑ |",
                "|---|---|---|---|---|"]  # fmt: skip

        def cells(v: dict[str, Any]) -> str:
            return (f"{_f(v['mmd'], 4)} | {_f(v['modes_covered'], 1)} | "
                    f"{_f(v['high_quality'], 3)}")  # fmt: skip
    else:
        head = ["| model | NFE | FD ↓ | precision ↑ | recall ↑ |", "|---|---|---|---|---|"]

        def cells(v: dict[str, Any]) -> str:
            return f"{_f(v['fd'], 2)} | {_f(v['precision'], 3)} | {_f(v['recall'], 3)}"

    lines = list(head)
    for k, v in s["teacher"].items():
        lines.append(f"| teacher (DDIM) | {k} | {cells(v)} |")
    for lb, a in s["arms"].items():
        if "nfe" not in a:
            lines.append(f"| {lb} | – | failed: {'; '.join(a['errors'].values())[:120]} | | |")
            continue
        for k, v in a["nfe"].items():
            lines.append(f"| {lb} | {k} | {cells(v)} |")
    lines.append(f"| pure noise | 0 | {cells(s['noise'])} |")
    lines.append(f"| real data (floor) | – | {cells(s['floor'])} |")
    return lines


def _directions_md(s: dict[str, Any]) -> list[str]:
    d, m = s.get("directions") or {}, s["metric"]
    if not d:
        return []
    name = "MMD" if m == "mmd" else "FD"
    dig = 4 if m == "mmd" else 2
    ts = s["teacher_steps"]
    out = []
    d1 = d["d1"]
    parts = []
    for x in d1["arms"]:
        beats = "/".join(map(str, x["beats_teacher_at"])) or "none"
        fac = f"{x['factor_vs_teacher']:.1f}×" if x["factor_vs_teacher"] is not None else "n/a"
        parts.append(f"{x['arm']} best {x['best']:.{dig}f} at {x['best_nfe']} NFE ({fac} the "
                     f"teacher's {d['teacher_ref']:.{dig}f} at {ts}; beats the teacher at NFE "
                     f"{beats})")  # fmt: skip
    verdict = (
        ("**holds** for " + ", ".join(d1["holds_for"])) if d1["holds"] else "**does not hold**"
    )
    out.append(f"1. *A 1–4-step student approaches the {ts}-step teacher and beats the teacher "
               f"at the same NFE* (approaches: the best student {name} within "
               f"{d['approach_factor']:g}× the teacher's): {verdict}. "
               + "; ".join(parts) + ".")  # fmt: skip
    if "d2" in d:
        x = d["d2"]
        sec = "mode coverage" if x["secondary"] == "coverage" else "recall"
        spread = ", within the seed spread" if x["within_spread"] else ""
        verdict = "holds" if x["holds"] else "does not hold"
        out.append(f"2. *DMD2 ≥ consistency at 1 step*: **{verdict}**"
                   f" — 1-NFE {name} DMD2 {x['dmd2']:.{dig}f} vs consistency distillation "
                   f"{x['cd']:.{dig}f} (DMD2 − CD, same seed: {x['diff']['mean']:+.{dig}f} ± "
                   f"{x['diff']['std']:.{dig}f}{spread}); {sec} {x['dmd2_secondary']:.3f} vs "
                   f"{x['cd_secondary']:.3f}.")  # fmt: skip
    if "d3" in d:
        x = d["d3"]
        extra = ""
        if "ct_teacher_init" in x:
            extra = (f" From the teacher's weights (never querying it) consistency training "
                     f"reaches {x['ct_teacher_init']:.{dig}f}.")  # fmt: skip
        out.append(f"3. *Consistency training without a teacher lands within the distillation "
                   f"result's range*: **{'holds' if x['holds'] else 'does not hold'}** — 1-NFE "
                   f"{name} {x['ct']:.{dig}f}, {x['position']} of the teacher-querying "
                   f"objectives ({', '.join(x['arms'])}: {x['range'][0]:.{dig}f}–"
                   f"{x['range'][1]:.{dig}f}).{extra}")  # fmt: skip
    return out


def _timing_md(p: dict[str, Any]) -> list[str]:
    rows = [(rk, s["timing"]) for rk, s in p["recipes"].items() if s.get("timing")]
    if not rows:
        return []
    lines = ["| recipe | teacher at 50 NFE, ms/sample | teacher at 1 NFE | 1-step student | "
             "ms/sample | speed-up (per-round range) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for rk, t in rows:
        lat = t["latency_ms"]
        tref = lat[f"teacher@{t['teacher_steps']}"]["median"]
        for lb, sp in t["speedup"].items():
            lines.append(f"| {p['recipes'][rk]['recipe']} | {tref:.3f} | "
                         f"{lat['teacher@1']['median']:.4f} | {lb} | "
                         f"{lat[f'{lb}@1']['median']:.4f} | {sp['median']:.0f}× "
                         f"({sp['min']:.0f}–{sp['max']:.0f}) |")  # fmt: skip
    t0 = rows[0][1]
    return [
        f"**Sampling speed-up on CPU** (one torch thread, as the recipes evaluate; median of "
        f"{t0['rounds']} interleaved rounds, each the median of 3 calls, after a warm-up; "
        f"256 points or 64 images per call; seed {t0['seed']}; timed after all training, with "
        "nothing else running):",
        "",
        *lines,
        "",
        "Teacher and students share one architecture, so the speed-up is about the NFE ratio; "
        "the consistency students' sampler adds a little arithmetic per step.",
    ]


def markdown(p: dict[str, Any], img: str | None) -> str:
    """The docs/benchmarks.md section."""
    recs = p["recipes"]
    seeds = p["seeds"]
    lines = [
        "## Few-step diffusion students",
        "",
        f"Issue #18. Each objective distils the shipped recipe's teacher into a student with the "
        f"same architecture; seeds {seeds}, mean ± std over seeds. The teacher is scored with "
        "DDIM at 1, 2, 4, 8 and 50 NFE and every student at 1, 2 and 4 NFE, with the code "
        "`mentor distill` / `mentor eval` use (`mentor.engine.diffusion.evaluate`; per seed the "
        "same initial noise for every model, `train.seed` + 7919). Lower MMD / FD is better.",
        "",
    ]
    if "2d" in recs and "teacher" in recs["2d"]:
        s = recs["2d"]
        fit = ", ".join(f"{v:.0f}" for v in s["teacher_fit_s"].values())
        lines += [
            f"### `{s['recipe']}`: MMD and mode coverage vs NFE",
            "",
            f"A teacher per seed, fitted with that seed ({fit} s to fit or to load from the "
            f"fitted-teacher cache), so the spread includes the teacher's. {s['steps']} student "
            f"steps (DMD2 {s['dmd2_steps']}). MMD against {s.get('reference', 'fresh draws')}; "
            "a mode is covered when a sample lies within 3 std of it."
            + (f" Overrides: `{' '.join(s['over'])}`." if s["over"] else ""),
            "",
            *_nfe_table(s),
            "",
            "`dmd2` and `embedding_mmd` train a 1-step generator: at 2 and 4 NFE it runs on the "
            "schedule's trailing grid with fresh re-noising, which it was not trained for. "
            "`progressive` and `hyper_sd_tscd` sample with DDIM, the consistency objectives with "
            "multistep consistency sampling.",
            "",
        ]
    if "digits" in recs and "teacher" in recs["digits"]:
        s = recs["digits"]
        fn = s.get("feature_net") or {}
        acc = fn.get("held_out_accuracy")
        lines += [
            f"### `{s['recipe']}`: classifier-feature FD and precision/recall vs NFE",
            "",
            "**FD is the Fréchet distance in the penultimate features of a small classifier "
            "(CNN, channels 16/32, hidden 64, 20 epochs on the training images' labels"
            + (f", held-out accuracy {acc:.3f}" if acc is not None else "")
            + "), not FID: Inception weights are not available offline.** One classifier "
            "(fitted with seed 0) scores every run; precision/recall (k = 3) use the same "
            "features, against the held-out images.",
            "",
            f"One teacher (fitted with seed {seeds[0]}) is shared by every seed through "
            f"`teacher.path`, so the spread is the students' (and the evaluation noise's). "
            f"Reduced run length: {s['steps']} consistency steps (the recipe ships 1,000) and "
            f"{s['dmd2_steps']} DMD2 steps (0.3×: the recipe's equal-time ratio)."
            + (f" Overrides: `{' '.join(s['over'])}`." if s["over"] else ""),
            "",
            *_nfe_table(s),
            "",
        ]
    lines += ["### Objectives and settings", "",
              "The recipes' tuned `diffusion.params` blocks (`consistency_distillation`, `dmd2`) "
              "as shipped; every other objective at its defaults except the run-length settings "
              "below. Train time is the wall clock of `distill` (with the run's set-up), on one "
              f"thread, {p['workers']} run(s) at a time.", "",
              "| recipe | arm | objective | overrides | setting | steps | train s | "
              "diverged / failed |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in recs.values():
        for lb, a in s.get("arms", {}).items():
            ov = " ".join(f"`{o}`" for o in a["over"]) or "–"
            bad = []
            if a.get("diverged_seeds"):
                bad.append("fake score diverged: seeds " + ", ".join(map(str, a["diverged_seeds"])))
            if a["errors"]:
                bad.append("failed: seeds " + ", ".join(a["errors"]))
            lines.append(f"| {s['recipe']} | {lb} | `{a['objective']}` | {ov} | {a['why']} | "
                         f"{a.get('steps', '–')} | {_f(a.get('train_s'), 0)} | "
                         f"{'; '.join(bad) or '–'} |")  # fmt: skip
    lines += ["", "### Paper directions", ""]
    for s in recs.values():
        md = _directions_md(s)
        if md:
            lines += [f"`{s['recipe']}`:", "", *md, ""]
    lines += _timing_md(p)
    if img:
        lines += ["", f"![few-step diffusion students]({img})"]
    errs = [f"{k}: {v}" for s in recs.values() for k, v in s.get("errors", {}).items()]
    if errs:
        lines += ["", "**Failed:** " + "; ".join(errs)]
    lines += [
        "",
        C.machine_line(p["machine"]) + p.get("load_note", "")
        + f" Whole benchmark {p['total_s'] / 60:.1f} min ({p['workers']} worker process(es)). "
        "Regenerate with `.venv/bin/python -m benchmarks.diffusion`.",
    ]  # fmt: skip
    return "\n".join(lines)


def plot(p: dict[str, Any], path: Path) -> Path | None:
    """Per recipe: the main metric (top) and mode coverage / recall (bottom) vs NFE."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = [(rk, s) for rk, s in p["recipes"].items() if "teacher" in s]
    if not recs:
        return None
    fig, axes = plt.subplots(2, len(recs), figsize=(6.2 * len(recs), 7.5), squeeze=False)
    labels = sorted({lb for _, s in recs for lb in s["arms"]})
    colors = {lb: plt.cm.tab10(i % 10) for i, lb in enumerate(labels)}
    for col, (_, s) in enumerate(recs):
        main_key = s["metric"]
        sec = "coverage" if main_key == "mmd" else "recall"
        for row, key in enumerate((main_key, sec)):
            ax = axes[row][col]
            ks = [int(k) for k in s["teacher"]]
            ax.errorbar(ks, [v[key]["mean"] for v in s["teacher"].values()],
                        yerr=[v[key]["std"] for v in s["teacher"].values()], color="k", lw=2,
                        marker="o", capsize=3, label="teacher (DDIM)")  # fmt: skip
            for lb, a in s["arms"].items():
                if "nfe" not in a:
                    continue
                ks = [int(k) for k in a["nfe"]]
                ax.errorbar(ks, [v[key]["mean"] for v in a["nfe"].values()],
                            yerr=[v[key]["std"] for v in a["nfe"].values()], color=colors[lb],
                            marker="s", ms=4, capsize=2, label=lb)  # fmt: skip
            if s["floor"][key]["mean"] > 0:
                ax.axhline(s["floor"][key]["mean"], color="grey", ls=":", lw=1, label="real data")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks_all := [int(k) for k in s["teacher"]])
            ax.set_xticklabels([str(k) for k in ks_all])
            if row == 0:
                if key == "mmd":  # unbiased MMD can dip below 0 near a perfect fit
                    ax.set_yscale("symlog", linthresh=1e-3)
                    ax.set_ylim(bottom=0)
                else:
                    ax.set_yscale("log")
                ax.set_title(f"{s['recipe']}: {'MMD' if key == 'mmd' else 'classifier-feature FD'}")
            else:
                ax.set_title(f"{s['recipe']}: {'mode coverage' if key == 'coverage' else 'recall'}")
            ax.set_xlabel("NFE")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    return C.save_figure(fig, path)


if __name__ == "__main__":
    main(sys.argv[1:])

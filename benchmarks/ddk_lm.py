"""DDK on the causal-LM pair: BBC topics as domains, domain re-weighting vs plain sampling.

The ``causal-lm`` recipe (SmolLM2-135M-Instruct → a 6-layer ``layer_drop`` copy, forward KL)
on BBC News blocks packed within each topic (``data.params.domains=true``). Two arms at equal
steps, 3 seeds, the same blocks:

* ``uniform``: the recipe as shipped — blocks drawn uniformly from the training set (so each
  topic in proportion to its text);
* ``ddk``: ``selection.method=ddk``, ``every: "K steps"`` — topics drawn in proportion to the
  student/teacher held-out perplexity ratio, re-measured every K steps (Liu et al., "DDK:
  Distilling Domain Knowledge for Efficient Large Language Models", 2024).

Both students are scored by the same function on the same held-out blocks: each topic's
perplexity, their mean and the worst topic's.

    .venv/bin/python -m benchmarks.ddk_lm [--quick] [--seeds 0 1 2] [--steps 40]

``--quick``: the ``tiny-lm`` recipe with 3 synthetic domains (seconds; results/quick/).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks import _common as C

NAME = "ddk_lm"


def _ms(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def settings(quick: bool, steps: int | None, every: int | None) -> dict[str, Any]:
    """The recipe, its overrides and the DDK interval."""
    if quick:
        return {
            "recipe": "tiny-lm", "domain_desc": "3 synthetic Markov chains (branching 4, 6, 8)",
            "over": ["data.params.domains=3", "data.params.n=240", "teacher.fit.epochs=2",
                     "eval.every=null"],
            "steps": steps or 20, "every": every or 5, "eval_blocks": 8,
        }  # fmt: skip
    return {
        "recipe": "causal-lm", "domain_desc": "the 5 BBC News topics",
        "over": ["data.params.domains=true", "data.params.block_size=64",
                 "data.params.max_blocks=1200", "data.val_fraction=0.1", "eval.every=null"],
        "steps": steps or 40, "every": every or 10, "eval_blocks": 16,
    }  # fmt: skip


def run_arm(
    st: dict[str, Any], arm: str, seed: int, work: Path, teacher_losses: list[float] | None
) -> dict[str, Any]:
    """One run; per-domain held-out perplexity of its student (and of the teacher)."""
    from mentor.assembly import Assembly, distill
    from mentor.config import load_config
    from mentor.domain_mixing import DomainMixture
    from mentor.students import load_model

    over = [*st["over"], f"train.max_steps={st['steps']}", f"train.seed={seed}",
            "train.progress=false", "train.schedule=constant",
            f"output.dir={work / f'{arm}-{seed}'}"]  # fmt: skip
    if arm == "ddk":
        over += ["selection.method=ddk", f"selection.every={st['every']} steps",
                 "selection.params.domain=domain",
                 f"selection.params.eval_blocks={st['eval_blocks']}"]  # fmt: skip
    cfg = load_config(st["recipe"], over)
    t0 = time.perf_counter()
    res = distill(cfg, quiet=True, final=False)  # scored below, per domain
    train_s = time.perf_counter() - t0
    asm = Assembly(cfg)
    bundle = asm.data
    student = load_model(res.run_dir / "student")[0]
    judge = DomainMixture(
        f"{st['every']} steps", asm.teacher_source(), bundle.train, asm.collate, bundle.val,
        domain="domain", names=bundle.info.extra.get("domains"),
        eval_blocks=st["eval_blocks"], batch_size=cfg.eval.batch_size,
    )  # fmt: skip
    s = judge.domain_losses(student).tolist()
    t = teacher_losses or judge.domain_losses(None, teacher=True).tolist()
    names = judge.names
    ppl = {n: math.exp(x) for n, x in zip(names, s)}
    out = {
        "arm": arm, "seed": seed, "train_s": train_s, "domains": names,
        "student_ppl": ppl, "teacher_ppl": {n: math.exp(x) for n, x in zip(names, t)},
        "mean_ppl": statistics.mean(ppl.values()), "worst_ppl": max(ppl.values()),
        "worst_domain": max(ppl, key=ppl.get),  # type: ignore[arg-type]
        "teacher_losses": t,
    }  # fmt: skip
    if arm == "ddk":
        import json

        sel = json.loads((res.run_dir / "selection.json").read_text())
        out["rounds"] = [{"step": r["step"], "domain_weights": r["domain_weights"]}
                         for r in sel["rounds"]]  # fmt: skip
    print(f"[{arm} seed {seed}] mean ppl {out['mean_ppl']:.2f} worst {out['worst_ppl']:.2f} "
          f"({out['worst_domain']}) in {train_s:.0f} s", flush=True)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both arms x seeds, write JSON, plot and the docs section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--every", type=int, default=None)
    a = ap.parse_args(argv)
    if a.quick:
        C.use_quick_outputs()
        a.seeds = a.seeds if a.seeds != [0, 1, 2] else [0]
    st = settings(a.quick, a.steps, a.every)
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    teacher: list[float] | None = None
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in a.seeds:
            for arm in ("uniform", "ddk"):
                r = run_arm(st, arm, seed, Path(tmp), teacher)
                teacher = r["teacher_losses"]
                runs.append(r)
    arms: dict[str, Any] = {}
    for arm in ("uniform", "ddk"):
        rs = [r for r in runs if r["arm"] == arm]
        names = rs[0]["domains"]
        arms[arm] = {
            "mean_ppl": _ms([r["mean_ppl"] for r in rs]),
            "worst_ppl": _ms([r["worst_ppl"] for r in rs]),
            "per_domain": {n: _ms([r["student_ppl"][n] for r in rs]) for n in names},
        }
    paired = {
        k: _ms([d["ddk"][k] - d["uniform"][k] for d in _by_seed(runs)])
        for k in ("mean_ppl", "worst_ppl")
    }
    payload = {
        "machine": C.machine_info(), "load_note": C.load_note(), "quick": a.quick,
        "settings": st, "seeds": a.seeds, "runs": runs, "arms": arms,
        "ddk_minus_uniform": paired, "teacher_ppl": runs[0]["teacher_ppl"],
        "total_s": time.perf_counter() - t0,
    }  # fmt: skip
    C.publish(NAME, payload, markdown, lambda path: plot(payload, path))
    return payload


def _by_seed(runs: list[dict[str, Any]]) -> list[dict[str, dict[str, Any]]]:
    seeds = sorted({r["seed"] for r in runs})
    return [{r["arm"]: r for r in runs if r["seed"] == s} for s in seeds]


def plot(p: dict[str, Any], path: Path) -> Path | None:
    """Per-domain held-out perplexity of both arms (mean ± std over seeds) and the teacher."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(p["teacher_ppl"])
    fig, ax = plt.subplots(figsize=(7, 3.8))
    w = 0.27
    for j, arm in enumerate(("uniform", "ddk")):
        d = p["arms"][arm]["per_domain"]
        ax.bar([i + (j - 0.5) * w for i in range(len(names))], [d[n]["mean"] for n in names],
               w, yerr=[d[n]["std"] for n in names], capsize=3, label=arm)  # fmt: skip
    ax.scatter(range(len(names)), [p["teacher_ppl"][n] for n in names], color="k",
               marker="_", s=300, label="teacher", zorder=3)  # fmt: skip
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(f"DDK vs plain sampling, {p['settings']['steps']} steps")
    ax.legend()
    return C.save_figure(fig, path)


def markdown(p: dict[str, Any], img: str | None) -> str:
    """The docs/benchmarks.md section."""
    st, arms, d = p["settings"], p["arms"], p["ddk_minus_uniform"]
    names = list(p["teacher_ppl"])
    f = lambda m: f"{m['mean']:.2f} ± {m['std']:.2f}"  # noqa: E731
    lines = [
        "## DDK on the causal-LM pair (BBC topics as domains)",
        "",
        f"Recipe `{st['recipe']}` with `{' '.join(st['over'])}`: blocks packed within each of "
        f"{st['domain_desc']}. Two arms at {st['steps']} optimizer steps each, the same blocks "
        f"and seeds {p['seeds']}: **uniform** (the recipe: blocks drawn uniformly, each "
        f"domain in proportion to its text) and **ddk** (`selection.method=ddk`, proportions "
        f"re-measured every {st['every']} steps from the student/teacher held-out perplexity "
        f"ratio, smoothing 0.5; Liu et al., 2024). Both students are scored by the same "
        f"function on the same held-out blocks ({st['eval_blocks']} per domain): mean ± std "
        f"over seeds.",
        "",
        "| arm | mean ppl | worst-domain ppl | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for arm in ("uniform", "ddk"):
        a = arms[arm]
        lines.append(f"| {arm} | {f(a['mean_ppl'])} | {f(a['worst_ppl'])} | "
                     + " | ".join(f(a["per_domain"][n]) for n in names) + " |")  # fmt: skip
    lines.append("| teacher | " + f"{sum(p['teacher_ppl'].values()) / len(names):.2f} | "
                 f"{max(p['teacher_ppl'].values()):.2f} | "
                 + " | ".join(f"{p['teacher_ppl'][n]:.2f}" for n in names) + " |")  # fmt: skip
    better = lambda k: d[k]["mean"] < 0  # noqa: E731
    noise = lambda k: abs(d[k]["mean"]) > d[k]["std"]  # noqa: E731
    verdict = []
    for k, what in (("worst_ppl", "worst-domain"), ("mean_ppl", "mean")):
        verdict.append(
            f"{what} perplexity: DDK − uniform {d[k]['mean']:+.2f} ± {d[k]['std']:.2f} (same "
            f"seed) — DDK {'lower' if better(k) else 'not lower'}"
            + ("" if noise(k) else ", within the seed spread")
        )
    lines += ["", "Paper direction (DDK lowers the worst domains' gap at equal compute): "
              + "; ".join(verdict) + ".", ""]  # fmt: skip
    rounds = next((r["rounds"] for r in p["runs"] if r["arm"] == "ddk"), [])
    if rounds:
        lines += [f"DDK's proportions per round (seed {p['seeds'][0]}; " + ", ".join(names)
                  + "): " + "; ".join(f"step {r['step']}: "
                                      + "/".join(f"{w:.2f}" for w in r["domain_weights"])
                                      for r in rounds) + ".", ""]  # fmt: skip
    if img:
        lines += [f"![ddk]({img})", ""]
    lines.append(
        C.machine_line(p["machine"]) + p.get("load_note", "")
        + f" Whole benchmark {p['total_s'] / 60:.1f} min. Regenerate with "
        "`.venv/bin/python -m benchmarks.ddk_lm`."
    )  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])

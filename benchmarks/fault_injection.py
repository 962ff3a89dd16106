"""Fault injection: kill runs, damage every artifact, inject NaN and I/O errors — count what
mentor detects and whether resumed runs end identical to uninterrupted ones.

    .venv/bin/python -m benchmarks.fault_injection [--kills 20] [--quick]

Writes ``benchmarks/results/fault_injection.json`` and the results section of
``docs/reliability.md`` (``--quick``: ``benchmarks/results/quick/``, the docs are left alone).
The test suite runs the ``--quick`` version.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from benchmarks import _common as C

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
BASE = ["train.progress=false", "eval.every=null", "student.params.hidden=[16]",
        "train.epochs=null", "train.log_every=20"]  # fmt: skip


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student" / "model.safetensors"))


def _same(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _steps(run: Path) -> list[int]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs if r["kind"] == "train"]


def _cli(run: Path, over: list[str]) -> list[str]:
    return [sys.executable, "-m", "mentor.cli", "distill", "digits", f"output.dir={run}", *over]


def kill9(work: Path, kills: int, steps: int, seed: int) -> dict[str, Any]:
    """``kills`` runs, each SIGKILLed at a random time, then resumed to the end."""
    from mentor.cli import main

    teacher = work / "teacher_run"
    over = [*BASE, f"train.max_steps={steps}", "train.checkpoint_every=25"]
    assert main(["distill", "digits", f"output.dir={teacher}", *over, "teacher.fit.epochs=5"]) == 0
    over += [f"teacher.path={teacher}/teacher", "teacher.fit=null"]
    ref = work / "ref"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads for every run compared
    t0 = time.perf_counter()
    subprocess.run(_cli(ref, over), check=True, capture_output=True, env=env)
    duration = time.perf_counter() - t0
    rng = random.Random(seed)
    out = {"runs": 0, "killed": 0, "resumed_ok": 0, "identical": 0, "metrics_clean": 0}
    for i in range(kills):
        run = work / f"killed{i}"
        p = subprocess.Popen(_cli(run, over), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        out["runs"] += 1
        if p.poll() is None:
            p.kill()
            out["killed"] += 1
        p.wait()
        args = _cli(run, over) + (["--resume"] if run.exists() else [])
        r = subprocess.run(args, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"resume {i} failed: {r.stderr[-500:]}", flush=True)
            continue
        out["resumed_ok"] += 1
        out["identical"] += _same(ref, run)
        s = _steps(run)
        out["metrics_clean"] += s == sorted(set(s)) and s[-1] == steps
    out["run_seconds"] = round(duration, 2)
    return out


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: max(1, len(data) // 2)])
    else:  # flip one byte in the second half (tensor data, not only a header)
        b = bytearray(data)
        b[len(b) // 2 + (len(b) // 4)] ^= 0xFF
        path.write_bytes(bytes(b))


def artifacts(work: Path) -> list[dict[str, Any]]:
    """Each artifact kind truncated and byte-flipped: detected, and named in the message?"""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from mentor.cache import verify_cache
    from mentor.cli import main
    from mentor.engine import checkpoint as ckpt

    over = [*BASE, "train.max_steps=40", "train.checkpoint_every=10", "teacher.fit.epochs=3"]
    rows = []
    for how in ("truncate", "flip"):
        base = work / f"art-{how}"
        cache = work / f"cache-{how}"
        assert main(["distill", "digits", f"output.dir={base}", *over]) == 0
        assert main(["cache", "digits", "--out", str(cache), "--top-k", "4", *over]) == 0
        targets = {
            "checkpoint weights": "trainable.safetensors",
            "optimizer state": "optimizer.pt",
            "scheduler state": "scheduler.pt",
            "training state": "state.json",
            "RNG state": "rng_rank0.json",
        }
        for kind, name in targets.items():
            run = work / f"{kind.replace(' ', '_')}-{how}"
            shutil.copytree(base, run)
            shutil.rmtree(run / "student")
            _damage(ckpt.list_checkpoints(run)[-1] / name, how)
            buf = io.StringIO()
            with redirect_stdout(buf), redirect_stderr(buf):
                rc = main(["distill", "digits", f"output.dir={run}", *over, "--resume"])
            text = buf.getvalue()
            rows.append({"artifact": kind, "fault": how, "detected": "damaged" in text,
                         "named": name in text, "recovered": rc == 0 and _same(base, run)})  # fmt: skip
        # metrics.jsonl: a torn (truncated) last line is repaired; a flipped byte may be silent
        run = work / f"metrics-{how}"
        shutil.copytree(base, run)
        shutil.rmtree(run / "student")
        _damage(run / "metrics.jsonl", how)
        buf = io.StringIO()
        with redirect_stdout(buf), redirect_stderr(buf):
            rc = main(["distill", "digits", f"output.dir={run}", *over, "--resume"])
        valid = all(
            json.loads(x) is not None for x in (run / "metrics.jsonl").read_text().splitlines()
        )
        rows.append({"artifact": "metrics.jsonl", "fault": how, "detected": "dropped" in buf.getvalue() or "no record" in buf.getvalue(),
                     "named": "metrics.jsonl" in buf.getvalue(), "recovered": rc == 0 and valid})  # fmt: skip
        # cache shard and manifest: `mentor cache verify` names them
        for kind, rel in (
            ("cache shard", "shards/train-00000.parquet"),
            ("cache manifest", "manifest.json"),
        ):
            c = work / f"{kind.replace(' ', '_')}-{how}"
            shutil.copytree(cache, c)
            _damage(c / rel, how)
            problems = verify_cache(c)
            text = " ".join(problems)
            buf = io.StringIO()
            with redirect_stdout(buf), redirect_stderr(buf):
                rc = main(["cache", "digits", "--out", str(c), "--top-k", "4", *over])
            repaired = rc == 0 and not verify_cache(c)
            rows.append({"artifact": kind, "fault": how, "detected": bool(problems),
                         "named": Path(rel).name in text, "recovered": repaired})  # fmt: skip
        # the fitted teacher kept in the run directory and in $MENTOR_CACHE/teachers
        run = work / f"teacher-{how}"
        shutil.copytree(base, run)
        _damage(run / "teacher" / "model.safetensors", how)
        from mentor.assembly import load_run
        from mentor.engine.checkpoint import verify
        from mentor.students import load_model

        problems = verify(run / "teacher")
        buf = io.StringIO()
        with redirect_stdout(buf), redirect_stderr(buf):
            teacher = load_run(run).teacher  # the damaged copy is skipped, never loaded
        good = load_model(base / "teacher")[0].state_dict()
        same = all(torch.equal(v, good[k]) for k, v in teacher.state_dict().items())
        rows.append({"artifact": "fitted teacher", "fault": how, "detected": bool(problems),
                     "named": "model.safetensors" in " ".join(problems) + buf.getvalue(),
                     "recovered": same})  # fmt: skip
    return rows


def nan_and_io(work: Path, trials: int, seed: int) -> dict[str, Any]:
    """NaN injected at a random step (caught, named); disk full / read-only (clean error)."""
    from unittest import mock

    from mentor.assembly import Assembly
    from mentor.cli import main
    from mentor.config import load_config
    from mentor.engine import Distiller
    from mentor.engine import checkpoint as ckpt
    from mentor.engine.loop import NonFiniteError
    from mentor.teachers import OnlineTeacher

    rng = random.Random(seed)
    out = {"nan_injected": 0, "nan_caught_at_step": 0, "io_faults": 0, "io_clean_errors": 0,
           "io_nothing_lost": 0}  # fmt: skip
    for i in range(trials):
        at = rng.randint(2, 30)
        cfg = load_config("digits", [f"output.dir={work}/nan{i}", *BASE, "train.max_steps=40",
                                     "train.checkpoint_every=5", "teacher.fit.epochs=2"])  # fmt: skip
        asm = Assembly(cfg)
        calls: list[int] = []

        class NaNAt(OnlineTeacher):
            def __call__(self, batch: dict[str, Any], calls: list = calls, at: int = at) -> Any:
                calls.append(1)
                o = super().__call__(batch)
                if len(calls) == at:
                    o.logits = o.logits * float("nan")
                return o

        out["nan_injected"] += 1
        try:
            Distiller(asm.student, NaNAt(asm.module()), asm.objective, asm.data.train, cfg).fit()
        except NonFiniteError as e:
            out["nan_caught_at_step"] += f"step {at}:" in str(e)
    over = [*BASE, "train.max_steps=40", "train.checkpoint_every=10", "teacher.fit.epochs=2"]
    ref = work / "io-ref"
    assert main(["distill", "digits", f"output.dir={ref}", *over]) == 0
    for code, where in ((errno.ENOSPC, "torch.save"), (errno.EROFS, "torch.save")):
        run = work / f"io-{code}"
        real = torch.save
        n = {"calls": 0}

        def failing(*a: Any, _code: int = code, n: dict = n, real: Any = real, **k: Any) -> Any:
            n["calls"] += 1
            if n["calls"] == 3:  # the third checkpoint's optimizer state
                raise OSError(_code, os.strerror(_code), str(a[1]))
            return real(*a, **k)

        out["io_faults"] += 1
        with mock.patch(where, failing):
            rc = main(["distill", "digits", f"output.dir={run}", *over])
        intact = all(not ckpt.verify(d) for d in ckpt.list_checkpoints(run))
        out["io_clean_errors"] += rc == 2
        rc2 = main(["distill", "digits", f"output.dir={run}", *over, "--resume"])
        out["io_nothing_lost"] += intact and rc2 == 0 and _same(ref, run)
    return out


def markdown(res: dict[str, Any]) -> str:
    k, n = res["kill9"], res["nan_io"]
    lines = [
        f"{res['machine']} (`python -m benchmarks.fault_injection`, {res['date']}).",
        "",
        "| fault | injected | detected / handled | identical or recovered |",
        "|---|---|---|---|",
        f"| `kill -9` at a random time, then `--resume` | {k['runs']} runs ({k['killed']} killed "
        f"mid-run) | {k['resumed_ok']} resumed | {k['identical']} bit-identical weights, "
        f"{k['metrics_clean']} with no duplicate/missing metrics |",
        f"| NaN in the teacher signal at a random step | {n['nan_injected']} | "
        f"{n['nan_caught_at_step']} stopped at that step, exit 2 | last good checkpoint kept |",
        f"| disk full / read-only during a checkpoint | {n['io_faults']} | {n['io_clean_errors']} "
        f"clean errors, exit 2 | {n['io_nothing_lost']} resumed to identical weights |",
    ]
    rows = res["artifacts"]
    det = sum(r["detected"] for r in rows)
    named = sum(r["named"] for r in rows)
    rec = sum(r["recovered"] for r in rows)
    lines += [
        f"| artifact truncated or byte-flipped | {len(rows)} | {det} detected, {named} named the "
        f"file | {rec} recovered |",
        "",
        "| artifact | fault | detected | file named | recovered |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        yn = {True: "yes", False: "**no**"}
        lines.append(f"| {r['artifact']} | {r['fault']} | {yn[r['detected']]} | "
                     f"{yn[r['named']]} | {yn[r['recovered']]} |")  # fmt: skip
    return "\n".join(lines)


def update_doc(text: str) -> None:
    start, end = "<!-- fault_injection:start -->", "<!-- fault_injection:end -->"
    doc = DOC.read_text()
    before, rest = doc.split(start, 1)
    _, after = rest.split(end, 1)
    DOC.write_text(f"{before}{start}\n{text}\n{end}{after}")


def run(kills: int = 20, steps: int = 1500, trials: int = 5, quick: bool = False) -> dict:
    """Run every part; returns the results (also written as JSON)."""
    from datetime import date

    info = C.machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MENTOR_CACHE", str(Path(tmp) / "mentor-cache"))
        work = Path(tmp)
        res = {
            "date": str(date.today()),
            "machine": C.machine_line(info),
            "kill9": kill9(work, kills, steps, seed=0),
            "artifacts": artifacts(work),
            "nan_io": nan_and_io(work, trials, seed=0),
        }
    C.write_json("fault_injection", res)
    if not quick:
        update_doc(markdown(res))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--quick", action="store_true", help="2 kills, 2 NaN trials; docs untouched")
    a = p.parse_args()
    if a.quick:
        C.use_quick_outputs()
        res = run(kills=2, steps=300, trials=2, quick=True)
    else:
        res = run(kills=a.kills, steps=a.steps)
    print(markdown(res))


if __name__ == "__main__":
    main()

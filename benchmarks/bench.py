"""``rpat bench`` (or ``python benchmarks/bench.py``): speed and memory numbers, as JSON lines and a table.

Every comparison is a ratio measured in one run (medians over repeats, warm-up excluded), so a
loaded machine shifts both sides alike. Lines (``name``, ``value``, ``unit`` + identifying settings):

  train_step                   seconds per training step, one line per objective x rpat
  rpat_overhead_<objective>    step time ratio, RPAT on / off
  reference_step               seconds per step of a re-creation of the published code's hot path
  speedup_vs_reference         reference step time / rpat step time (PGD-AT and PGD-AT+RPAT)
  eval_clean / eval_pgd20 / eval_autoattack     images per second
  autoattack_wrapper_overhead  the evaluation's AutoAttack measurement / pyautoattack called directly
  data_loading                 images per second delivered by the in-memory loader (crop+flip)
  data_vs_step                 loader rate / training-step rate (>1: data is not the bottleneck)
  eval_1_shard / eval_2_shards seconds for one cell's evaluation (AutoAttack dominates) as 1 process, and as 2
                               concurrent shard processes (``eval.shards: 2``, merged and checked equal)
  shard_speedup                eval_1_shard / eval_2_shards
  plan_paper_grid              seconds for ``snakemake -n`` on config/paper.yaml
  demo_wall                    seconds for the whole demo grid (``--demo`` only)
  peak_rss_train / peak_rss_eval    MB of host memory of a real demo-sized job (+ device MB on GPU)

A benchmark that cannot measure (its command fails) says so on stderr and the run exits with code 1, after
the other benchmarks have run; nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from rpat import data, models, objectives
from rpat.averaging import WeightAverage
from rpat.objectives import EpochPlan
from rpat.settings import Threat
from rpat.train import train_step

ROOT = Path(__file__).resolve().parents[1]


class CannotMeasure(RuntimeError):
    """A benchmark's command failed: no number for it."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _model(name: str, channels: int, size: int, device, channels_last=False):
    torch.manual_seed(0)
    m = models.build(name, num_classes=10, in_channels=channels, image_size=size).to(device)
    return m.to(memory_format=torch.channels_last) if channels_last else m


def make_train_step(objective_name: str, rpat: bool, model, x, y, threat: Threat, precision: str = "float32"):
    """One training step exactly as rpat.train runs it (attack, loss, backward, SGD, the objective's hooks, the
    weight average of methods that keep one), with the method's regulariser active."""
    obj = objectives.OBJECTIVES[objective_name]
    hp = dict(obj.defaults)
    average = WeightAverage(model).eval() if obj.uses_teacher else None
    if obj.views == 2:
        x, y = torch.cat([x, x.flip(0)]), y.repeat(2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    rp = {"weight": 1.0, "clean_weight": 0.5} if rpat else None
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16) if precision == "bf16" else None
    plan = EpochPlan(threat, reg_active=True, average_decay=obj.defaults.get("decay", 0.0))

    def step():
        model.train()
        train_step(obj, model, opt, x, y, plan, hp, rp, amp=amp, average=average)

    return step


def make_reference_step(model, x, y, threat: Threat, rpat: bool):
    """The published Benchmarks code's PGD-AT(+RPAT) step, re-created from its specification: advertorch
    0.2.3's PGD (sum-reduced CE, ``loss.backward()`` into the parameters at every attack iteration, the
    perturbation updated through ``.data``), the model in eval mode for the attack, then the training
    forwards of adv_train(_ra).py and a ``.item()`` per step for logging."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    eps, alpha, iters = threat.eps, threat.step, threat.steps

    def step():
        model.eval()
        delta = torch.zeros_like(x).uniform_(-eps, eps)
        delta = torch.clamp(x + delta, 0, 1) - x
        delta.requires_grad_()
        for _ in range(iters):
            loss = F.cross_entropy(model(x + delta), y, reduction="sum")
            loss.backward()
            delta.data = delta.data + alpha * delta.grad.data.sign()
            delta.data = torch.clamp(delta.data, -eps, eps)
            delta.data = torch.clamp(x.data + delta.data, 0, 1) - x.data
            delta.grad.data.zero_()
        x_adv = torch.clamp(x + delta.data, 0, 1).detach()
        model.train()
        z_adv = model(x_adv)
        loss = F.cross_entropy(z_adv, y)
        if rpat:
            z_mid = model(0.5 * x + 0.5 * x_adv)
            z_cln = model(x)
            loss = loss + F.mse_loss(z_mid, 0.5 * z_cln + 0.5 * z_adv)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()

    return step


def bench_train_steps(out: Callable[[dict], None], *, model_name: str, batch: int, size: int, channels: int,
                      steps: int, repeats: int, device, objectives_list: list[str], precision: str = "float32",
                      channels_last: bool = False) -> dict:
    torch.manual_seed(0)
    x = torch.rand(batch, channels, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    threat = Threat("linf", 8 / 255, 2 / 255, steps)
    result = {}
    for name in objectives_list:
        step_fns = {}
        for rp in (False, True):
            model = _model(model_name, channels, size, device, channels_last)
            step_fns[rp] = make_train_step(name, rp, model, x, y, threat, precision)
            step_fns[rp]()  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = {False: [], True: []}
        for _ in range(repeats):  # interleaved, so drifting machine load hits both alike
            for rp in (False, True):
                times[rp].append(median_time(step_fns[rp], 1, 0, device))
        for rp in (False, True):
            sec = result[(name, rp)] = statistics.median(times[rp])
            line = {"name": "train_step", "value": sec, "unit": "s/step", "objective": name, "rpat": rp,
                    "model": model_name, "batch": batch, "image_size": size, "attack_steps": steps,
                    "device": str(device), "precision": precision, "channels_last": channels_last}
            if device.type == "cuda":
                line["peak_device_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            out(line)
        out({"name": f"rpat_overhead_{name}", "value": result[(name, True)] / result[(name, False)],
             "unit": "ratio", "objective": name, "model": model_name, "batch": batch, "device": str(device)})
    return result


def bench_reference(out, *, model_name, batch, size, steps, repeats, device, ours: dict | None = None) -> None:
    torch.manual_seed(0)
    x = torch.rand(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    threat = Threat("linf", 8 / 255, 2 / 255, steps)
    for rp in (False, True):
        ref_model = _model(model_name, 3, size, device)
        our_model = _model(model_name, 3, size, device)
        ref_step = make_reference_step(ref_model, x, y, threat, rp)
        our_step = make_train_step("pgd_at", rp, our_model, x, y, threat)
        ref_t, our_t = [], []
        for _ in range(repeats):  # interleaved, so drifting machine load hits both alike
            ref_t.append(median_time(ref_step, 1, 0 if ref_t else 1, device))
            our_t.append(median_time(our_step, 1, 0 if our_t else 1, device))
        ref, our = statistics.median(ref_t), statistics.median(our_t)
        common = {"objective": "pgd_at", "rpat": rp, "model": model_name, "batch": batch, "attack_steps": steps,
                  "device": str(device)}
        out({"name": "reference_step", "value": ref, "unit": "s/step", **common})
        out({"name": "rpat_step", "value": our, "unit": "s/step", **common})
        out({"name": "speedup_vs_reference", "value": ref / our, "unit": "ratio", **common})


def bench_eval(out, *, device, n: int, repeats: int) -> None:
    """Clean / PGD-20 / AutoAttack throughput, and rpat's AutoAttack wrapper against pyautoattack directly."""
    from rpat.accuracy import accuracies

    splits = data.load_splits("digits", {"val_size": 0})
    x, y = data.to_float(splits.test[0][:n]).to(device), splits.test[1][:n].to(device)
    model = _model("cnn", 1, 8, device).eval()
    batches = data.Batches(x, y, 500, device=device)
    threat = Threat("linf", 0.2, 0.05, 20)

    t_clean = median_time(lambda: accuracies(model, batches, threat, steps=0), repeats, 1, device)
    t_pgd = median_time(lambda: accuracies(model, batches, threat, steps=20, with_clean=False), repeats, 1, device)
    out({"name": "eval_clean", "value": n / t_clean, "unit": "img/s", "model": "cnn", "n": n, "device": str(device)})
    out({"name": "eval_pgd20", "value": n / t_pgd, "unit": "img/s", "model": "cnn", "n": n, "device": str(device)})
    d, w, ratio, pairs = autoattack_times(model, batches, threat, 2 * ((repeats + 1) // 2), device)
    out({"name": "eval_autoattack", "value": n / w, "unit": "img/s", "model": "cnn (untrained)", "n": n,
         "device": str(device)})
    out({"name": "autoattack_wrapper_overhead", "value": ratio, "unit": "ratio", "direct_s": d, "wrapped_s": w,
         "pairs_s": pairs, "n": n, "device": str(device), "threads": torch.get_num_threads()})


def autoattack_times(model, batches, threat: Threat, pairs: int, device) -> tuple[float, float, float, list]:
    """Seconds of pyautoattack's standard evaluation called directly and of the evaluation's AutoAttack
    measurement (rpat/evaluation/measurements.py: attack by attack on the examples still robust) on the same
    examples, checked to agree example by example. One warm-up of each, then pairs run in alternating order
    (direct first, then wrapped first, ...), so neither side always runs on a machine the other has warmed or
    slowed. Returns the median seconds of each, the median over the pairs of wrapped / direct, and the pairs'
    seconds (direct, wrapped)."""
    from pyautoattack import AutoAttack

    from rpat.evaluation.engine import EvalContext
    from rpat.evaluation.measurements import MEASUREMENTS
    from rpat.settings import EvalSettings

    settings = EvalSettings()
    aa = settings.autoattack
    ctx = EvalContext(model, threat, settings, batches, key="aa")

    def direct():
        adversary = AutoAttack(model, norm="Linf", eps=threat.eps, seed=aa.seed, version=aa.version, device=device)
        return adversary.run_standard_evaluation(batches.x, batches.y, batch_size=500)[1] == batches.y

    def wrapped():
        return MEASUREMENTS["aa"].measure(ctx).correct

    if not torch.equal(direct().cpu(), wrapped().cpu()):
        raise RuntimeError("the AutoAttack measurement and pyautoattack disagree on some example")
    times: dict[str, list[float]] = {"direct": [], "wrapped": []}
    for i in range(pairs):
        for name, fn in (("direct", direct), ("wrapped", wrapped))[:: 1 if i % 2 == 0 else -1]:
            times[name].append(median_time(fn, 1, 0, device))
    pair_s = [[round(d, 3), round(w, 3)] for d, w in zip(times["direct"], times["wrapped"])]
    ratio = statistics.median(w / d for d, w in pair_s)
    return statistics.median(times["direct"]), statistics.median(times["wrapped"]), ratio, pair_s


def bench_data(out, *, device, batch: int, step_rate: float | None, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (10_000, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (10_000,), generator=g)
    loader = data.Batches(x, y, batch, shuffle=True, augment=data.random_crop_flip, device=device, generator=g)

    def epoch():
        for xb, _ in loader:
            pass
        return xb

    sec = median_time(epoch, repeats, 1, device)
    rate = len(y) / sec
    out({"name": "data_loading", "value": rate, "unit": "img/s", "augment": "crop_flip", "batch": batch,
         "image_size": 32, "device": str(device)})
    if step_rate:
        out({"name": "data_vs_step", "value": rate / step_rate, "unit": "ratio", "device": str(device)})


def _run_peak(cmd: list[str], cwd: Path) -> tuple[int, float]:
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise CannotMeasure(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return proc.returncode, usage.ru_maxrss / 1024  # KB -> MB on Linux


QUICK_JOB = """experiment: bench-memory
tracking: {enabled: false}
grid: [{dataset: [digits], model: [cnn], norm: [linf], method: [trades], rpat: [true], seed: [0]}]
data: {val_size: 100, augment: none, batch_size: 64, train_subset: 512}
threat: {linf: {eps: 0.2, step: 0.05, steps: 5}}
train: {epochs: 1, schedule: {name: constant}}
eval: {n_examples: 50}
"""


SHARD_JOB = """experiment: bench-shards
tracking: {{enabled: false}}
grid: [{{dataset: [digits], model: [cnn], norm: [linf], method: [pgd_at], rpat: [false], seed: [0]}}]
data: {{val_size: 100, augment: none, batch_size: 64, train_subset: 512}}
threat: {{linf: {{eps: 0.1, step: 0.025, steps: 3}}}}
train: {{epochs: 4, schedule: {{name: constant}}}}
eval: {{n_examples: {n}, block_size: 8, pgd_steps: 5, cw_steps: 5}}
"""


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rpat", *args, "--threads", "1"], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait(procs: list[subprocess.Popen], what: str) -> float:
    """Wait for ``procs``; the CPU seconds they used (a loaded machine shows as CPU time well under wall time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise CannotMeasure(f"{what}: {' '.join(map(str, p.args))} failed:\n{err[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def _evaluate_sharded(job: list[str], tmp: Path, shards: int) -> tuple[float, float]:
    """Wall and CPU seconds of one evaluation as ``shards`` concurrent processes (merged when more than one)."""
    names = ["one.json"] if shards == 1 else [f"two-{i}.json" for i in range(1, shards + 1)]
    args = [["--out", names[0]]] if shards == 1 else [["--shard", f"{i}/{shards}", "--out", name]
                                                      for i, name in enumerate(names, 1)]
    t0 = time.perf_counter()
    cpu = _wait([_start(["evaluate", *job, *a], tmp) for a in args], f"eval_{shards}_shard{'s' * (shards > 1)}")
    wall = time.perf_counter() - t0
    if shards > 1:
        _wait([_start(["evaluate", *job, "--merge", *names, "--out", "two.json"], tmp)], "eval_2_shards (merge)")
    return wall, cpu


def bench_shards(out, *, quick: bool) -> None:
    """One cell's evaluation (AutoAttack on blocks of 8) as one process and as 2 shard processes run at once and
    merged (in the order 1, 2 then 2, 1 unless quick, medians), checking that the merged per-example outcomes
    equal the single process's."""
    from rpat.evaluation.results import read_outcomes

    n = 16 if quick else 32  # AutoAttack on digits costs ~1 s per robust example on one CPU thread
    cell = "digits/cnn/linf/pgd_at/seed0"
    times: dict[int, list] = {1: [], 2: []}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "shards.yaml").write_text(SHARD_JOB.format(n=n))
        job = ["--config", "shards.yaml", "--cell", cell]
        _wait([_start(["train", *job], tmp)], "eval shards (training the cell)")
        for shards in (1, 2) if quick else (1, 2, 2, 1):  # a drifting load hits both alike
            times[shards].append(_evaluate_sharded(job, tmp, shards))
        load.append(os.getloadavg()[0])
        a, b = read_outcomes(tmp / "one.npz"), read_outcomes(tmp / "two.npz")
        if a.keys() != b.keys() or any((a[k] != b[k]).any() for k in a):
            raise CannotMeasure("eval_2_shards: the merged shards' outcomes differ from the single process's")
        aa = json.loads((tmp / "one.json").read_text())["seconds"]["aa"]
        shard_aa = [json.loads((tmp / f"two-{i}.json").read_text())["measured"]["aa"]["seconds"] for i in (1, 2)]
    one, two = (statistics.median(w for w, _ in times[k]) for k in (1, 2))
    common = {"cell": cell, "n_examples": n, "block_size": 8, "threads_per_process": 1, "repeats": len(times[1])}
    out({"name": "eval_1_shard", "value": one, "unit": "s", "autoattack_s": aa,
         "cpu_s": statistics.median(c for _, c in times[1]), **common})
    out({"name": "eval_2_shards", "value": two, "unit": "s", "processes": 2, "autoattack_s": shard_aa,
         "cpu_s": statistics.median(c for _, c in times[2]), **common})
    out({"name": "shard_speedup", "value": one / two, "unit": "ratio", "cpus": os.cpu_count(),
         "load_avg_before_after": load, **common})


def bench_jobs(out, *, demo: bool, quick: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plans = []
        for _ in range(2):  # the first run may rebuild the registry catalog after a code change
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--snakefile", str(ROOT / "Snakefile"),
                                  "--configfile", str(ROOT / "config" / "paper.yaml")], cwd=tmp, capture_output=True,
                                 text=True)
            plans.append(time.perf_counter() - t0)
        if res.returncode != 0:
            raise CannotMeasure(f"plan_paper_grid: `snakemake -n` on config/paper.yaml failed:\n{res.stderr[-2000:]}")
        jobs = re.search(r"^total\s+(\d+)$", res.stdout, re.M)
        out({"name": "plan_paper_grid", "value": plans[1], "unit": "s", "first_run_s": plans[0],
             "jobs": int(jobs[1]) if jobs else None})
        cfg = ROOT / "config" / "config.yaml"
        if quick:  # the demo's cell, shrunk to one epoch and 50 AutoAttack examples
            cfg = tmp / "quick.yaml"
            cfg.write_text(QUICK_JOB)
        cell = "digits/cnn/linf/trades+rpat/seed0"
        _, rss = _run_peak([sys.executable, "-m", "rpat", "train", "--config", str(cfg), "--cell", cell,
                            "--threads", "1"], tmp)
        job = f"{'shrunk ' if quick else ''}demo {cell}"
        out({"name": "peak_rss_train", "value": rss, "unit": "MB", "job": job})
        _, rss = _run_peak([sys.executable, "-m", "rpat", "evaluate", "--config", str(cfg), "--cell", cell,
                            "--threads", "1"], tmp)
        out({"name": "peak_rss_eval", "value": rss, "unit": "MB", "job": job})
        if demo:
            cfg = ROOT / "config" / "config.yaml"
            (tmp / "demo").mkdir()
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--snakefile",
                                  str(ROOT / "Snakefile"), "--configfile", str(cfg)], cwd=tmp / "demo",
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise CannotMeasure(f"demo_wall: the demo grid failed:\n{res.stderr[-2000:]}")
            out({"name": "demo_wall", "value": time.perf_counter() - t0, "unit": "s", "cores": 2})


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="rpat bench", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="JSON lines only")
    p.add_argument("--quick", action="store_true", help="small settings (< 3 minutes on a 2-core CPU)")
    p.add_argument("--demo", action="store_true", help="also time the whole demo grid")
    p.add_argument("--reference", action="store_true",
                   help="also compare with the published code's step (resnet18_bottleneck, batch 16, PGD-10)")
    p.add_argument("--only", default=None,
                   help="comma-separated sections to run: train,data,eval,shards,reference,jobs (default: all that "
                   "apply)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", choices=["float32", "bf16"], default="float32")
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args(argv)

    from rpat.runtime import select_device, set_threads

    device = select_device(args.device)
    set_threads(args.threads)
    rows: list[dict] = []

    def out(line: dict) -> None:
        line = {"name": line.pop("name"), "value": line.pop("value"), "unit": line.pop("unit"), **line}
        rows.append(line)
        print(json.dumps(line), flush=True)

    if args.quick:
        cfg = dict(model_name="cnn", batch=32, size=16, channels=3, steps=10, repeats=5)
    elif device.type == "cuda":
        cfg = dict(model_name="preact_resnet18", batch=128, size=32, channels=3, steps=10, repeats=10)
    else:  # CPU: a CIFAR-shaped batch through the small CNN (the reference comparison uses its own network)
        cfg = dict(model_name="cnn", batch=64, size=32, channels=3, steps=10, repeats=5)
    sections = set(args.only.split(",")) if args.only else {"train", "data", "eval", "shards", "jobs"} | (
        {"reference"} if args.reference else set())
    step_rate = None
    if "train" in sections:
        names = [n for n, o in objectives.OBJECTIVES.items() if o.supports_rpat and (not args.quick or n != "noise")]
        steps = bench_train_steps(out, device=device, objectives_list=names, precision=args.precision,
                                  channels_last=args.channels_last, **cfg)
        step_rate = cfg["batch"] / steps[("pgd_at", True)]
    if "data" in sections:
        bench_data(out, device=device, batch=cfg["batch"], step_rate=step_rate, repeats=3)
    if "eval" in sections:
        bench_eval(out, device=device, n=32 if args.quick else 100, repeats=3)
    if "reference" in sections:
        bench_reference(out, model_name="resnet18_bottleneck", batch=16, size=32, steps=10,
                        repeats=3 if device.type == "cpu" else 10, device=device)
    failed = []
    if "shards" in sections:
        try:
            bench_shards(out, quick=args.quick)
        except CannotMeasure as e:
            failed.append(str(e))
    if "jobs" in sections or args.demo:
        try:
            bench_jobs(out, demo=args.demo, quick=args.quick)
        except CannotMeasure as e:
            failed.append(str(e))
    if not args.json:
        print(f"\n{'name':<30} {'value':>12} {'unit':<8} settings", file=sys.stderr)
        for r in rows:
            settings = {k: v for k, v in r.items() if k not in ("name", "value", "unit")}
            print(f"{r['name']:<30} {r['value']:>12.4g} {r['unit']:<8} {json.dumps(settings)}", file=sys.stderr)
    for msg in failed:
        print(f"rpat bench: could not measure: {msg}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The retraining queue: one job per model to train on a subset and measure, resumable, in
parallel processes (one per core, one thread each).

A job is done when its outputs file exists (written atomically at its end); a killed run starts
the jobs without one again, and a job's training resumes from its last checkpoint in the work
folder (train_diffusion's .state). Each outputs file records the job's wall and CPU seconds, so the
cost of the ground truth is the sum over the files.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from ctrak_fast.bench.counterfactual.probes import Probes, measure
from ctrak_fast.bench.counterfactual.setting import CounterfactualSetting, mask_from_text
from ctrak_fast.engine.atomic import atomic_write_text
from ctrak_fast.models.factor_unet import load_model
from ctrak_fast.progress import report
from ctrak_fast.train.diffusion import train_diffusion

__all__ = [
    "Job", "pending", "run_jobs", "run_job", "generation_rate", "judged_samples", "read_outputs",
    "copy_identical",
]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """Train on the images of `mask` (0/1 text over the training set) with `seed`, measure the
    probes; `rate` lists (query, factor) pairs whose concept generation rate to measure too;
    `arm`: the removal arm the job retrains ("q<query>f<factor>/<row>/<percent>")."""

    name: str
    mask: str
    seed: int
    rate: tuple[tuple[int, int], ...] = ()
    arm: str = ""


def pending(jobs: Sequence[Job], outputs: Path) -> list[Job]:
    """The jobs without an outputs file, in order."""
    return [j for j in jobs if not (outputs / f"{j.name}.json").exists()]


def read_outputs(outputs: Path, names: Sequence[str]) -> dict[str, dict]:
    """The outputs of the named jobs that are done: {name: outputs dict}."""
    out = {}
    for n in names:
        p = outputs / f"{n}.json"
        if p.exists():
            out[n] = json.loads(p.read_text())
    return out


@torch.no_grad()
def judged_samples(model, judge, combo, factor: int, n: int, guidance: float, seed: int) -> dict:
    """n samples of `combo` (CFG `guidance`, drawn from `seed`), each judged: bool [n] tensors
    'the judge reads combo's value of `factor`' (concept) and 'the whole combination'."""
    from ctrak_fast.method import diffusion

    gen = torch.Generator().manual_seed(seed)
    cond = torch.tensor(combo, dtype=torch.long)[None].expand(n, -1)
    x0, _ = diffusion.ddim_sample(model, cond, guidance=guidance, generator=gen)
    pred = judge.predict(x0.clamp(-1, 1))
    return {"concept": pred[:, factor] == cond[:, factor], "combination": (pred == cond).all(1)}


def generation_rate(model, judge, combo, factor: int, n: int, guidance: float, seed: int) -> dict:
    """How often the model draws the concept: of judged_samples, the fraction the judge reads as
    combo's value of `factor`, and as the whole combination."""
    hits = judged_samples(model, judge, combo, factor, n, guidance, seed)
    return {k: float(v.float().mean()) for k, v in hits.items()}


def run_job(job: Job, folder: str, work: str, device: str = "cpu", progress: bool = False) -> str:
    """Train (on `device`), measure (on the CPU: a few hundred forward passes) and write
    `<folder>/outputs/<job>.json`; returns the job's name."""
    torch.set_num_threads(1)
    wall, cpu = time.time(), time.process_time()
    root = Path(folder)
    setting = CounterfactualSetting.load(root / "setting.json")
    data = setting.dataset()
    keep = mask_from_text(job.mask, len(data))
    ckpt = Path(work) / f"{job.name}.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    model = train_diffusion(
        data.subset(keep), ckpt, steps=setting.steps, batch_size=setting.batch_size,
        lr=setting.lr, seed=job.seed, progress=progress, model_kwargs=setting.model_kwargs(),
        checkpoint_every=250, hflip=True, device=device,
    ).cpu()  # fmt: skip
    out = {"job": job.name, "seed": job.seed, "n_train": int(keep.sum())}
    probes = Probes.load(root / "probes.safetensors")
    out.update(measure(model, probes))
    if job.rate:
        judge = load_model(root / "judge.safetensors")
        out["rate"] = {
            f"{q},{f}": generation_rate(
                model,
                judge,
                probes.combos[q].tolist(),
                f,
                setting.removal_samples,
                setting.guidance,
                seed=setting.probe_seed * 7919 + q,
            )  # fmt: skip
            for q, f in job.rate
        }
    out["seconds"] = time.time() - wall
    out["cpu_seconds"] = time.process_time() - cpu
    outputs = root / "outputs"
    outputs.mkdir(exist_ok=True)
    atomic_write_text(outputs / f"{job.name}.json", json.dumps(out) + "\n")
    ckpt.unlink(missing_ok=True)  # the outputs are the result; the weights are not kept
    return job.name


def run_jobs(
    jobs: Sequence[Job],
    folder: Path,
    work: Path,
    workers: int = 2,
    limit: int | None = None,
    on_done: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> list[str]:
    """Run the pending jobs (at most `limit`) on `workers` processes, training on `device`;
    returns the names done. on_done(name) runs in this process after each job."""
    outputs = folder / "outputs"
    copied = copy_identical(jobs, pending(jobs, outputs), outputs)
    todo, keys = [], set()
    for j in pending(jobs, outputs):  # one of each identical group; the others are copied after
        if (j.mask, j.seed, j.rate) not in keys:
            keys.add((j.mask, j.seed, j.rate))
            todo.append(j)
    todo = todo[:limit]
    if not todo:
        return copied
    report(f"counterfactual: {len(todo)} jobs to run on {workers} processes")
    done: list[str] = []
    t0 = time.time()
    if workers <= 1:
        for j in todo:
            done.append(run_job(j, str(folder), str(work), device))
            _log_done(done, len(todo), t0, on_done)
    else:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # each process one core
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(run_job, j, str(folder), str(work), device) for j in todo}
            while futures:
                finished, futures = wait(futures, return_when=FIRST_COMPLETED)
                for fut in finished:
                    done.append(fut.result())
                    _log_done(done, len(todo), t0, on_done)
    return copied + done + copy_identical(jobs, pending(jobs, outputs), outputs)


def copy_identical(jobs: Sequence[Job], todo: Sequence[Job], outputs: Path) -> list[str]:
    """Jobs identical to a done one (same images, seed and measured rates; e.g. two methods that
    remove the same images) are not retrained: the done job's outputs are copied, with
    "same_as" naming it. Returns the names so written."""
    key = {(j.mask, j.seed, j.rate): j.name for j in jobs if (outputs / f"{j.name}.json").exists()}
    written = []
    for j in todo:
        twin = key.get((j.mask, j.seed, j.rate))
        if twin is None:
            continue
        out = json.loads((outputs / f"{twin}.json").read_text())
        out.update(job=j.name, same_as=twin)
        atomic_write_text(outputs / f"{j.name}.json", json.dumps(out) + "\n")
        written.append(j.name)
    return written


def _log_done(done: list[str], total: int, t0: float, on_done) -> None:
    el = time.time() - t0
    left = el / len(done) * (total - len(done))
    report(f"counterfactual: {done[-1]} done ({len(done)}/{total}, {el:.0f} s, ~{left:.0f} s left)")
    if on_done is not None:
        on_done(done[-1])

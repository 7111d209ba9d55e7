"""`ctrak bench counterfactual --retrain`: the phases of ground_truth.py in order, each resumed,
at most `max_jobs` retrained models per sitting. The removal arms come from the methods' scores,
so between the two retraining phases the benchmark scores the methods (bench.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ctrak_fast.bench.counterfactual.ground_truth import lds_jobs, prepare, removal_jobs
from ctrak_fast.bench.counterfactual.queue import pending, run_jobs
from ctrak_fast.bench.counterfactual.setting import CounterfactualSetting
from ctrak_fast.progress import report

__all__ = ["retrain_lds", "retrain_removal"]


def retrain_lds(
    truth: Path,
    work: Path,
    workers: int,
    max_jobs: int | None,
    setting_path: str | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> int | None:
    """Prepare and retrain the LDS subsets; returns how many jobs this sitting may still run
    (None: no limit). A new `truth` folder starts from `setting_path` (default: the shipped
    setting)."""
    from ctrak_fast.models.shipped import COUNTERFACTUAL

    if not (truth / "setting.json").exists():
        source = Path(setting_path) if setting_path else COUNTERFACTUAL / "setting.json"
        CounterfactualSetting.load(source)  # refused here if it is not a setting
        truth.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, truth / "setting.json")
    elif setting_path:
        raise ValueError(f"{truth} already has a setting.json: --setting is for a new folder")
    prepare(truth, work, progress, device)
    jobs = lds_jobs(truth)
    done = run_jobs(jobs, truth, work, workers, max_jobs, device=device)
    left = pending(jobs, truth / "outputs")
    if left:
        report(f"counterfactual: {len(left)} LDS models left; rerun to go on")
    return None if max_jobs is None else max_jobs - len(done)


def retrain_removal(
    truth: Path, work: Path, workers: int, max_jobs: int | None, device: str = "cpu"
) -> None:
    """Retrain the removal arms (written by the benchmark once every LDS model is measured)."""
    if max_jobs is not None and max_jobs <= 0:
        return
    jobs = removal_jobs(truth)
    run_jobs(jobs, truth, work, workers, max_jobs, device=device)
    left = pending(jobs, truth / "outputs")
    if left:
        report(f"counterfactual: {len(left)} removal models left; rerun to go on")

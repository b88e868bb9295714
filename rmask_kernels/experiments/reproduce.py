"""``rmask reproduce``: a plan's whole study (`plans`) as one resumable command.

    rmask reproduce --plan digits --out study/ [--jobs 2]
    rmask reproduce --plan paper --out study/ --data-path cifar-10-python.tar.gz --device cuda --jobs 4

Every step runs in its own directory ``OUT/steps/<key>`` (`plans.Step.key`: kind, name, hash of
the config). A step is done when its ``done.json`` exists; that file is written (atomically)
after everything else the step writes, so a rerun skips exactly the finished steps. A training
that was interrupted resumes from its ``last.pt`` (written atomically after every epoch); an
attack or evaluation that was interrupted starts over in an emptied directory. So a kill -9 at
any moment loses at most the steps in flight, and the epochs done of a training in flight are
kept.

``--jobs N`` runs up to N steps at once, each in a fresh process (spawn), as soon as the steps
it reads are done; with several GPUs and ``--device`` unset or ``cuda``, each step in flight gets
its own ``cuda:i``. Once every step is done, `report.write_report` writes ``OUT/results.csv``,
``OUT/report.md`` and the plots from the steps' rows (cheap: it reruns every time).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .attacks import attacks_by_name, craft, load_adversarial, save_adversarial
from .checkpoint import atomic_write
from .data import ImageData, load_dataset
from .distributed import resolve_device
from .evaluate import (
    clean_accuracy, decision_based_eval, defense_success_rate, noise_robustness, patch_shuffle_accuracy,
    transfer_predictions, white_box_result,
)
from .model_zoo import load_model
from .plans import ATTACK, EVALUATE, TRAIN, Plan, Step, build_steps, load_plan, shrink
from .report import write_report
from .train import LAST_CHECKPOINT, TrainConfig, train

__all__ = ["DONE_FILE", "ROWS_FILE", "STEPS_DIRECTORY", "add_arguments", "reproduce", "run", "run_step"]

STEPS_DIRECTORY, DONE_FILE, ROWS_FILE = "steps", "done.json", "rows.json"


def _write_json(path: Path, value: Any) -> None:
    text = json.dumps(value, indent=1, allow_nan=True) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()))


def is_done(step_directory: Path) -> bool:
    return (step_directory / DONE_FILE).is_file()


def _test_data(config: Dict[str, Any], data_path: Optional[str], limit: Optional[int] = None) -> ImageData:
    _, test = load_dataset(config["data"], data_path)
    limits = [count for count in (config["limit_test"], limit) if count is not None]
    return test.subset(slice(0, min(limits))) if limits and min(limits) < len(test) else test


def _trained_model(out: Path, key: str, device: torch.device) -> torch.nn.Module:
    # last.pt, not best.pt: best.pt is chosen on the same test images the attacks use.
    return load_model(out / STEPS_DIRECTORY / key / LAST_CHECKPOINT, device)


def _train(step: Step, directory: Path, device: torch.device, data_path: Optional[str], quiet: bool) -> None:
    config = TrainConfig.from_dict({**step.config["train"], "device": str(device), "data_path": data_path})
    train(config, directory, resume=(directory / LAST_CHECKPOINT).is_file(), quiet=quiet)


def _attack(step: Step, out: Path, directory: Path, device: torch.device, data_path: Optional[str]) -> None:
    config = step.config
    test = _test_data(config, data_path)
    source = _trained_model(out, config["source"], device)
    generator = torch.Generator().manual_seed(config["seed"])
    for position, spec in enumerate(attacks_by_name(config["attacks"])):
        crafted = craft(source, test.images, test.labels, spec, batch_size=config["batch_size"], generator=generator)
        meta = {"short_name": spec.short_name, "source": step.name, "data": config["data"]}
        save_adversarial(directory / f"{position:03d}.pt", crafted, meta)


def _evaluate(step: Step, out: Path, directory: Path, device: torch.device, data_path: Optional[str]) -> None:
    config = step.config
    test = _test_data(config, data_path)
    model = _trained_model(out, config["target"], device)
    batch_size = config["batch_size"]
    clean = clean_accuracy(model, test, batch_size)
    base = {"target": step.name, **config["labels"], "clean_accuracy": clean}
    rows: List[Dict[str, Any]] = [{**base, "setting": "clean", "attack": "none", "accuracy": clean}]

    def attack_row(setting: str, source: str, spec_text: str, short_name: str, eps, result) -> Dict[str, Any]:
        family = attacks_by_name([spec_text])[0].name
        return {**base, "setting": setting, "source": source, "attack": short_name, "family": family, "eps": eps,
                **result.as_row()}

    for item in config["transfer"]:
        for file in sorted((out / STEPS_DIRECTORY / item["attack_step"]).glob("*.pt")):
            crafted = load_adversarial(file)
            predictions = transfer_predictions(model, crafted, test, batch_size)
            source_fooled = crafted["source_prediction"] != crafted["label"]
            result = defense_success_rate(predictions.adversarial, predictions.clean, crafted["label"], source_fooled)
            rows.append(attack_row(item["setting"], item["source"], crafted["meta"]["attack"],
                                   crafted["meta"]["short_name"], crafted["meta"].get("eps"), result))
    if config["white_box"]:
        white_test = _test_data(config, data_path, config["white_box"]["limit"])
        generator = torch.Generator().manual_seed(config["seed"])
        for spec in attacks_by_name(config["white_box"]["attacks"]):
            crafted = craft(model, white_test.images, white_test.labels, spec, batch_size=batch_size,
                            generator=generator)
            rows.append(attack_row("white-box", step.name, str(spec), spec.short_name, spec.eps,
                                   white_box_result(crafted)))
    for eps in config["noise"]:
        accuracy = noise_robustness(model, test, eps / 255, batch_size, seed=config["seed"])
        rows.append({**base, "setting": "noise", "attack": f"noise-{eps:g}", "family": "noise", "eps": eps,
                     "accuracy": accuracy})
    height, width = test.image_size
    for s in config["patch_shuffle"]:
        if height % s or width % s:
            raise ValueError(f"patch_shuffle s={s} does not divide the {height}×{width} images of {config['data']}")
        accuracy = patch_shuffle_accuracy(model, test, s, batch_size, seed=config["seed"])
        rows.append({**base, "setting": "patch-shuffle", "attack": f"shuffle-{s}", "family": "patch-shuffle",
                     "s": s, "accuracy": accuracy})
    if config["decision"]:
        decision = config["decision"]
        result = decision_based_eval(model, test, decision["attack"], n=decision["n"], steps=decision["steps"],
                                     seed=config["seed"], batch_size=batch_size)
        rows.append({**base, "setting": "decision", "attack": decision["attack"], "family": decision["attack"],
                     **result.as_row()})
    _write_json(directory / ROWS_FILE, rows)


def run_step(step_dict: Dict[str, Any], out: str, device: Optional[str], data_path: Optional[str],
             quiet: bool = True, threads: Optional[int] = None) -> Dict[str, Any]:
    """Run one step (`Step.to_dict`) in ``out`` unless it is done; returns its done record.
    Module-level, taking plain values: the function --jobs workers run."""
    if threads:
        torch.set_num_threads(threads)
    step, out_path = Step.from_dict(step_dict), Path(out)
    directory = out_path / STEPS_DIRECTORY / step.key
    if is_done(directory):
        return json.loads((directory / DONE_FILE).read_text())
    started = time.perf_counter()
    resolved = resolve_device(device)
    if step.kind == TRAIN:
        _train(step, directory, resolved, data_path, quiet)
    else:
        shutil.rmtree(directory, ignore_errors=True)  # what an interrupted attempt left
        directory.mkdir(parents=True)
        (_attack if step.kind == ATTACK else _evaluate)(step, out_path, directory, resolved, data_path)
    record = {**step.to_dict(), "key": step.key, "seconds": time.perf_counter() - started, "device": str(resolved)}
    _write_json(directory / DONE_FILE, record)  # last: the step is done
    return record


# ---------------------------------------------------------------------------------------------
# The whole plan


def _devices(device: Optional[str], jobs: int) -> List[Optional[str]]:
    """One device per step in flight: cuda:0..k-1 in turn when several GPUs serve ``device``."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if jobs > 1 and count > 1 and device in (None, "cuda"):
        return [f"cuda:{index % count}" for index in range(jobs)]
    return [device] * jobs


def _progress(total: int, done: int):
    """A tqdm bar over the plan's steps on a terminal; None elsewhere (then one line per step)."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=done, desc="plan", unit="step", dynamic_ncols=True, file=sys.stderr)


def reproduce(plan: Plan, out: os.PathLike, device: Optional[str] = None, data_path: Optional[str] = None,
              jobs: int = 1, quiet: bool = False) -> List[Dict[str, Any]]:
    """Run every step of ``plan`` not done yet in ``out``, then write the report; returns the
    done records of the steps run in this call (in the order they finished)."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    out = Path(out)
    steps = build_steps(plan)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "plan.json", {"plan": plan.name, "steps": [step.key for step in steps]})
    pending = [step for step in steps if not is_done(out / STEPS_DIRECTORY / step.key)]
    bar = _progress(len(steps), len(steps) - len(pending))
    show = not quiet and bar is None
    executed: List[Dict[str, Any]] = []

    def finished(record: Dict[str, Any]) -> None:
        executed.append(record)
        if bar is not None:
            bar.update(1)
        elif show:
            print(f"[{len(steps) - len(pending)}/{len(steps)}] {record['key']} done in {record['seconds']:.1f} s",
                  flush=True)

    try:
        if jobs == 1:
            for step in list(pending):
                if bar is not None:
                    bar.set_postfix_str(step.key)
                elif show:
                    print(f"running {step.key}", flush=True)
                record = run_step(step.to_dict(), str(out), device, data_path, quiet=quiet or bar is None)
                pending.remove(step)
                finished(record)
        else:
            _run_parallel(pending, out, device, data_path, jobs, finished, bar)
    finally:
        if bar is not None:
            bar.close()
    rows = [row for step in steps if step.kind == EVALUATE
            for row in json.loads((out / STEPS_DIRECTORY / step.key / ROWS_FILE).read_text())]
    write_report(plan, rows, len(steps), out)
    return executed


def _run_parallel(pending: List[Step], out: Path, device: Optional[str], data_path: Optional[str], jobs: int,
                  finished, bar) -> None:
    """Submit each pending step once the steps it reads are done; one free device per step."""
    free = _devices(device, jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    waiting = {step.key: step for step in pending}
    running: Dict[concurrent.futures.Future, tuple] = {}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        while waiting or running:
            for key, step in list(waiting.items()):
                if not free:
                    break
                if any(dependency in waiting or any(dependency == other.key for other, _ in running.values())
                       for dependency in step.depends):
                    continue
                where = free.pop(0)
                future = pool.submit(run_step, step.to_dict(), str(out), where, data_path, True, threads)
                running[future] = (step, where)
                del waiting[key]
            if bar is not None:
                bar.set_postfix_str(", ".join(step.name for step, _ in running.values()))
            if not running:
                raise RuntimeError(f"steps wait for steps that are not in the plan: {', '.join(waiting)}")
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                step, where = running.pop(future)
                free.append(where)
                pending.remove(step)
                finished(future.result())  # a failed step raises here; the finished ones stay done


# ---------------------------------------------------------------------------------------------
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", required=True, metavar="NAME|FILE",
                        help="a built-in plan (digits, paper) or a plan file (JSON; copy a built-in one to edit)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="the study's directory: steps/, results.csv, report.md, plots (rerun to resume)")
    parser.add_argument("--data-path", default=None, help="CIFAR-10 archive/directory or MNIST directory")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="steps run at once in worker processes")
    shrinking = parser.add_argument_group("shrink every run (changes the steps' hashes: a separate study)")
    shrinking.add_argument("--epochs", type=int, default=None, help="epochs of every training")
    shrinking.add_argument("--limit-train", type=int, default=None, metavar="N", help="the first N train images")
    shrinking.add_argument("--limit-test", type=int, default=None, metavar="N", help="the first N test images")
    shrinking.add_argument("--smoke", action="store_true",
                           help="the smallest study of the plan's shape (1 epoch, a few images, short attacks)")
    parser.add_argument("--quiet", action="store_true", help="no progress")


def run(args: argparse.Namespace) -> int:
    for flag in ("epochs", "limit_train", "limit_test"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    plan = shrink(load_plan(args.plan), args.epochs, args.limit_train, args.limit_test, smoke=args.smoke)
    reproduce(plan, args.out, args.device, args.data_path, args.jobs, args.quiet)
    print(f"report: {args.out / 'report.md'}", flush=True)
    return 0

"""The output directory across runs: what a rerun clears, and which checkpoint it resumes from.

Checkpoints live in OUTPUT_DIR/checkpoints beside the arguments of the run that wrote them, so
that a rerun with the same arguments continues where an interrupted one stopped, and one with
other arguments is refused rather than mixed into it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .arguments import TrainingPlan
from .artifacts import METADATA_FILE, write_json_atomically
from .console import is_global_main_process
from .errors import ResumeMismatchError

REPORT_FILES = ("metrics.json", "validation_history.json", "validation_predictions.csv", "test_predictions.csv")
# Options that change nothing about the trained weights may differ on resume.
RESUME_NEUTRAL_OPTIONS = ("resume", "keep_checkpoints", "merge", "logging_steps", "output_dir",
                          "calibration", "threshold_for_precision", "threshold_for_recall", "category_route_recall")
RUN_ARGUMENTS_FILE = "run_arguments.json"


def clear_previous_results(output_dir: Path) -> None:
    """A rerun rewrites the directory: the old classifier stops counting as complete at once
    (its metadata goes first), and no report or merged model of the old run is left to mislead."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if not is_global_main_process():
        return
    (output_dir / METADATA_FILE).unlink(missing_ok=True)
    for name in REPORT_FILES:
        (output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(output_dir / "merged", ignore_errors=True)


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Checkpoints newest first, only those whose trainer_state.json (written last) exists."""
    found = [path for path in checkpoints_dir.glob("checkpoint-*") if path.name.split("-")[-1].isdigit()]
    found.sort(key=lambda path: int(path.name.split("-")[-1]), reverse=True)
    return [path for path in found if (path / "trainer_state.json").is_file()]


def checkpoint_to_resume(plan: TrainingPlan) -> Path | None:
    """The last complete checkpoint of an interrupted run with the same arguments, if any.

    A checkpoint cut short by a kill (no trainer_state.json) is removed; checkpoints of a run
    with other arguments are refused rather than silently mixed into this one. Only the main
    process changes files; under torchrun the other ranks read the same decision.
    """
    checkpoints_dir = plan.output_dir / "checkpoints"
    arguments = {k: v for k, v in plan.arguments_record().items() if k not in RESUME_NEUTRAL_OPTIONS}
    main = is_global_main_process()
    resumable = None
    if checkpoints_dir.is_dir() and plan.run.resume:
        complete = complete_checkpoints(checkpoints_dir)
        for path in checkpoints_dir.glob("checkpoint-*"):
            if path not in complete and main:
                shutil.rmtree(path, ignore_errors=True)
        recorded_path = checkpoints_dir / RUN_ARGUMENTS_FILE
        if complete:
            recorded = json.loads(recorded_path.read_text()) if recorded_path.is_file() else {}
            differing = sorted(key for key in set(recorded) | set(arguments) if recorded.get(key) != arguments.get(key))
            if differing:
                raise ResumeMismatchError(
                    f"{checkpoints_dir} holds checkpoints of a run with other arguments (differing: "
                    f"{', '.join(differing)}); pass --no-resume to start over, or use another --output-dir"
                )
            resumable = complete[0]
    elif checkpoints_dir.is_dir() and main:
        shutil.rmtree(checkpoints_dir)
    if main:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomically(checkpoints_dir / RUN_ARGUMENTS_FILE, arguments)
    return resumable

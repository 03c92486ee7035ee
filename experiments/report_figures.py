"""The figures in screenshots/ (experiments/report.py draws them): precision-recall and ROC curves
on the ToxicChat test file, validation AUPRC by epoch, the reliability diagram and each category
row's per-category bars and confusion matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from compare_methods import REPO_ROOT, RESULTS_DIR, TEST_SCORES_FILE

FIGURES_DIR = REPO_ROOT / "screenshots"
GOAL_CATEGORY_MACRO_F1 = 0.80  # the categories issue's goal, drawn on the category figure


def draw_figures(rows: list[dict], test_file: Path, results_dir: Path = RESULTS_DIR,
                 figures_dir: Path = FIGURES_DIR) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from sklearn.metrics import precision_recall_curve, roc_curve

    figures_dir.mkdir(exist_ok=True)
    labels = pd.read_csv(test_file)["toxicity"].to_numpy()
    scores = {}
    for row in rows:
        frame = pd.read_csv(results_dir / row["row"] / TEST_SCORES_FILE)
        if len(frame) != len(labels):
            raise SystemExit(f"error: {row['row']} has {len(frame)} test scores, {test_file} has {len(labels)} rows")
        scores[row["row"]] = frame.assign(label=labels)
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(rows), 2)))
    written = []

    def finish(figure, axes, title: str, xlabel: str, ylabel: str, name: str) -> None:
        axes.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="lower left" if name != "roc_curves.png" else "lower right")
        figure.tight_layout()
        figure.savefig(figures_dir / name, dpi=130)
        plt.close(figure)
        written.append(figures_dir / name)

    subtitle = "ToxicChat toxicchat0124, human-annotated test subset"
    figure, axes = plt.subplots(figsize=(8, 6))
    for colour, row in zip(colours, rows):
        frame = scores[row["row"]]
        precision, recall, _ = precision_recall_curve(frame["label"], frame["unsafe_probability"])
        axes.plot(recall, precision, color=colour, lw=1.4, label=f"{row['method']} (AUPRC {row['test']['auprc']:.3f})")
    prevalence = labels.mean()
    axes.axhline(prevalence, color="grey", ls=":", lw=1, label=f"chance (prevalence {prevalence:.3f})")
    finish(figure, axes, f"Precision-recall, {subtitle}", "recall (unsafe)", "precision (unsafe)", "pr_curves.png")

    figure, axes = plt.subplots(figsize=(8, 6))
    for colour, row in zip(colours, rows):
        frame = scores[row["row"]]
        false_positive, true_positive, _ = roc_curve(frame["label"], frame["unsafe_probability"])
        axes.plot(false_positive, true_positive, color=colour, lw=1.4,
                  label=f"{row['method']} (ROC-AUC {row['test']['roc_auc']:.3f})")
    axes.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="chance")
    finish(figure, axes, f"ROC, {subtitle}", "false-positive rate", "true-positive rate", "roc_curves.png")

    figure, axes = plt.subplots(figsize=(8, 5))
    for colour, row in zip(colours, rows):
        history = row["validation_history"]
        if not history:
            continue  # baselines have no epochs
        axes.plot([h["epoch"] for h in history], [h["auprc"] for h in history], marker="o", color=colour,
                  lw=1.4, label=row["method"])
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    axes.set(title="Validation AUPRC per epoch (validation split carved from train)", xlabel="epoch",
             ylabel="validation AUPRC", ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(figures_dir / "validation_auprc.png", dpi=130)
    plt.close(figure)
    written.append(figures_dir / "validation_auprc.png")
    written.append(draw_reliability_diagram(rows, scores, figures_dir))
    written += [draw_category_figure(row, figures_dir) for row in rows if row["validation"].get("categories")]
    return written


def category_order(categories: dict) -> list[str]:
    """The head's order (S1, S2, ... S12), which the confusion matrix keeps; metrics.json's keys are sorted as text."""
    return list(categories["confusion"]["labels"])


def draw_category_figure(row: dict, figures_dir: Path = FIGURES_DIR) -> Path:
    """`categories.png`: per-category precision / recall / F1 bars, and the confusion between
    categories (true category x highest-scoring category) on the category validation split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = row["validation"]["categories"]
    codes = category_order(categories)
    figure, (bars, heat) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    positions = np.arange(len(codes))
    for offset, key, colour in ((-0.27, "precision", "tab:blue"), (0, "recall", "tab:orange"), (0.27, "f1", "tab:green")):
        bars.bar(positions + offset, [categories["per_category"][code][key] for code in codes], width=0.27,
                 color=colour, label=key)
    bars.axhline(GOAL_CATEGORY_MACRO_F1, color="grey", ls=":", lw=1, label=f"macro-F1 goal {GOAL_CATEGORY_MACRO_F1}")
    bars.set_xticks(positions, [f"{code} {categories['per_category'][code]['name']}" for code in codes], fontsize=7,
                    rotation=35, ha="right")
    bars.set(ylim=(0, 1.22), ylabel="on the category validation split",
             title=f"{row['method']}: per category (macro F1 {categories['macro']['f1']:.3f})")
    bars.legend(fontsize=7, loc="upper right", ncol=4)
    bars.grid(axis="y", alpha=0.3)
    confusion = np.asarray(categories["confusion"]["rows_true_columns_top_scored"])
    heat.imshow(confusion, cmap="Blues")
    for (i, j), value in np.ndenumerate(confusion):
        if value:
            heat.text(j, i, str(value), ha="center", va="center", fontsize=6,
                      color="white" if value > confusion.max() / 2 else "black")
    heat.set_xticks(positions, codes, fontsize=6, rotation=90)
    heat.set_yticks(positions, codes, fontsize=6)
    heat.set(xlabel="highest-scoring category", ylabel="true category", title="Confusion between categories")
    figure.tight_layout()
    path = figures_dir / "categories.png"
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def draw_reliability_diagram(rows: list[dict], scores: dict[str, pd.DataFrame], figures_dir: Path = FIGURES_DIR) -> Path:
    """`reliability.png`: one panel per row, share of unsafe test rows against mean P(unsafe) in the
    ECE's 15 equal-width bins, calibrated and uncalibrated where a row's scores hold both columns
    (`uncalibrated_probability`, written since calibration exists); else the recorded scores alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from safety_classifier.calibration import ECE_BINS, expected_calibration_error, reliability_curve

    columns = 4
    lines = max((len(rows) + columns - 1) // columns, 1)
    figure, grid = plt.subplots(lines, columns, figsize=(3.2 * columns, 3.1 * lines), squeeze=False)
    for axes, row in zip(grid.flat, rows):
        frame = scores[row["row"]]
        if "uncalibrated_probability" in frame:
            curves = [("uncalibrated", frame["uncalibrated_probability"], "tab:red"),
                      ("calibrated", frame["unsafe_probability"], "tab:blue")]
        else:
            curves = [("uncalibrated (as recorded)", frame["unsafe_probability"], "tab:red")]
        for name, probabilities, colour in curves:
            curve = reliability_curve(frame["label"], probabilities)
            ece = expected_calibration_error(frame["label"], probabilities)
            axes.plot(curve["mean_probability"], curve["fraction_unsafe"], marker="o", ms=3, lw=1.2, color=colour,
                      label=f"{name}, ECE {ece:.3f}")
        axes.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        axes.set(title=row["method"], xlim=(0, 1), ylim=(0, 1))
        axes.title.set_fontsize(7)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=6, loc="upper left")
    for axes in list(grid.flat)[len(rows):]:
        axes.axis("off")
    for axes in grid.flat:
        axes.set(xlabel="mean P(unsafe) in bin", ylabel="share unsafe in bin")
        axes.xaxis.label.set_fontsize(7)
        axes.yaxis.label.set_fontsize(7)
    figure.suptitle(f"Reliability on the ToxicChat human-annotated test subset ({ECE_BINS} equal-width bins)")
    figure.tight_layout()
    path = figures_dir / "reliability.png"
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path

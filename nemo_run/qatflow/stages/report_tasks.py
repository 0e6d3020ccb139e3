"""09_report's task accuracy section: each evaluated model's lm-eval accuracy ± stderr per task, and its plot."""

from __future__ import annotations

from pathlib import Path

from qatflow.stage_results import TaskAccuracy

TASKS_PLOT = "tasks.png"


def _plot(rows: list[tuple[str, dict[str, TaskAccuracy]]], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 2.2 * len(tasks) + 2), 4))
    width = 0.8 / len(rows)
    for index, (label, scores) in enumerate(rows):
        offsets = [task_index - 0.4 + width * (index + 0.5) for task_index in range(len(tasks))]
        values = [scores[task].value if task in scores else 0.0 for task in tasks]
        errors = [(scores[task].stderr or 0.0) if task in scores else 0.0 for task in tasks]
        bars = ax.bar(offsets, values, width, yerr=errors, capsize=3, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(tasks)), [f"{task}\n({rows[0][1][task].metric})" if task in rows[0][1] else task
                                      for task in tasks], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (± standard error)")
    ax.set_title("task accuracy (lm-evaluation-harness)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def task_section(rows: list[tuple[str, dict[str, TaskAccuracy]]], out_dir: Path) -> list[str]:
    """The report's lines for the models' task accuracies (and tasks.png in out_dir); none where no task ran."""
    rows = [(label, scores) for label, scores in rows if scores]
    if not rows:
        return []
    tasks = list(dict.fromkeys(task for _, scores in rows for task in scores))
    _plot(rows, tasks, out_dir / TASKS_PLOT)
    lines = ["## Task accuracy", "",
             "lm-evaluation-harness on eval.tasks, each model as its evaluation stage computed it and the export as "
             "05_verify computes it, as served (prompts without the chat template, greedy generation); ± is the "
             "standard error over the examples.", "",
             "| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for label, scores in rows:
        cells = []
        for task in tasks:
            score = scores.get(task)
            if score is None:
                cells.append("n/a")
                continue
            stderr = f" ± {score.stderr:.3f}" if score.stderr is not None else ""
            cells.append(f"{score.value:.3f}{stderr} ({score.metric}, n={score.examples})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + ["", f"![task accuracy]({TASKS_PLOT})", ""]

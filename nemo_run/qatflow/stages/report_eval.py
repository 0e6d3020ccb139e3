"""09_report's sections on what a user decides on: the headline (KL to full precision of PTQ, the trained student
and the export as served), the out-of-domain text, and the models' greedy answers side by side."""

from __future__ import annotations

from qatflow.stage_results import EvalResult, Generations, Quality, TaskAccuracy, TextScores


def ppl_change(closed: float | None, full: float, ptq: float, trained: float) -> str:
    """How training moved perplexity relative to PTQ's gap: below full precision is said as such, not as a
    recovery above 100%, and so is a PTQ that left no gap."""
    if trained < full:
        return f"went below full precision ({trained:.3f} vs {full:.3f})"
    if closed is None or ptq <= full:
        return f"had no PTQ gap to close (PTQ {ptq:.3f}, full precision {full:.3f}; trained {trained:.3f})"
    return f"closed {100 * closed:.0f}% of the PTQ gap"


def _kl_share(kl: float, ptq_kl: float) -> str:
    return f"{100 * kl / ptq_kl:.0f}% of PTQ's" if ptq_kl > 0 else "PTQ's is 0"


def headline(labels: dict[str, str], evals: dict[str, EvalResult], served: Quality | None,
             served_label: str, served_text: TextScores | None = None,
             served_tasks: dict[str, TaskAccuracy] | None = None) -> list[str]:
    """KL to full precision (assistant tokens) and task accuracy of the trained student and the export as served,
    beside PTQ's and the full-precision model's."""
    full, ptq, trained = evals["06_eval_bf16"], evals["07_eval_ptq"], evals["08_eval_trained"]
    rows = [(labels["06_eval_bf16"], full, full.text, full.task_accuracy()),
            (labels["07_eval_ptq"], ptq, ptq.text, ptq.task_accuracy()),
            (labels["08_eval_trained"], trained, trained.text, trained.task_accuracy())]
    if served is not None:
        rows.append((served_label, served, served_text, served_tasks or {}))
    tasks = list(dict.fromkeys(task for *_, scores in rows for task in scores))
    lines = ["## Headline", "",
             ("| model | KL to full precision (assistant) | ppl (assistant) | out-of-domain KL | out-of-domain ppl | "
              + "".join(f"{task} | " for task in tasks)).rstrip(),
             "|---|---|---|---|---|" + "---|" * len(tasks)]
    for label, quality, text, scores in rows:
        ood = f"{text.kl:.4g} | {text.ppl:.3f}" if text is not None else "not scored | not scored"
        cells = "".join(f"{_accuracy(scores.get(task))} | " for task in tasks)
        lines.append(f"| {label} | {quality.kl_assistant:.4g} | {quality.ppl_assistant:.3f} | {ood} | {cells}".rstrip())
    best = served if served is not None else trained
    which = "the export as served" if served is not None else "the trained student"
    lines += ["", f"KL to full precision on held-out assistant tokens: {which} {best.kl_assistant:.4g} nats/token, "
                  f"{_kl_share(best.kl_assistant, ptq.kl_assistant)} ({ptq.kl_assistant:.4g}); lower is closer to "
                  f"the full-precision model."
                  + (" Tasks: accuracy ± standard error (Task accuracy, below)." if tasks else ""), ""]
    return lines


def _accuracy(score: TaskAccuracy | None) -> str:
    if score is None:
        return "n/a"
    return f"{score.value:.3f}" + (f" ± {score.stderr:.3f}" if score.stderr is not None else "")


def text_section(rows: list[tuple[str, TextScores | None]]) -> list[str]:
    """Perplexity and KL to full precision on the out-of-domain text, by model; nothing where it was not scored."""
    scored = [(label, text) for label, text in rows if text is not None]
    if not scored:
        return []
    text = scored[0][1]
    lines = ["## Out-of-domain text", "",
             f"Another domain than the chat data: {text.source}, its first {text.tokens + text.windows} tokens in "
             f"{text.windows} windows, no chat template, every token counted (eval.text_path, "
             f"eval.text_max_tokens).", "",
             "| model | ppl (all tokens) | KL to full precision |", "|---|---|---|"]
    lines += [f"| {label} | {scores.ppl:.3f} | {scores.kl:.4g} |" for label, scores in scored]
    return lines + [""]


def _cell(text: str, limit: int = 300) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    if not text:
        return "*(whitespace only)*"
    return text if len(text) <= limit else text[:limit] + " …"


def generation_section(rows: list[tuple[str, Generations | None]]) -> list[str]:
    """Each prompt with every model's greedy answer, then per model the mean length and the share that hit the
    limit without an end-of-turn token."""
    generated = [(label, generations) for label, generations in rows if generations is not None]
    if not generated:
        return []
    limit = generated[0][1].max_new_tokens
    lines = ["## Generations", "",
             f"Greedy answers, at most {limit} new tokens, to the first user turn of held-out conversations (the "
             f"conversation up to it rendered by the chat template with the generation prompt). end: the answer "
             f"ended with an end-of-turn / eos token; limit: it hit {limit} tokens without one.", ""]
    for index, answer in enumerate(generated[0][1].answers):
        lines += [f"**Prompt {index + 1}:** {_cell(answer['prompt'])}", "",
                  "| model | answer | tokens | stop |", "|---|---|---|---|"]
        for label, generations in generated:
            mine = generations.answers[index]
            stop = "end" if mine["ended"] else "limit" if mine["hit_limit"] else "other"
            lines.append(f"| {label} | {_cell(mine['text'])} | {mine['tokens']} | {stop} |")
        lines.append("")
    lines += ["| model | mean length (tokens) | hit the limit without end-of-turn |", "|---|---|---|"]
    lines += [f"| {label} | {g.mean_tokens:.1f} | {100 * g.hit_limit_share:.0f}% |" for label, g in generated]
    return lines + [""]

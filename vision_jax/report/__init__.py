"""A trained run's report: ``python -m vision_jax.report --workdir=RUN [--output=DIR]``.

:func:`write_report` writes into ``<workdir>/report`` (or ``output``):

* ``report.html``: one self-contained page (images embedded) with the run's name, task, model,
  step (a best step with the validation figure it was selected on) and headline metric, and
  everything below;
* ``training_curves.png``: training loss, each split's headline metric and the learning rate
  against step, from the run's TensorBoard event files (left out when there are none);
* ``per_class.csv``: the task's per-class table (classification: precision, recall, F1 and
  support with macro / weighted averages and accuracy, as scikit-learn's
  ``classification_report``; segmentation: IoU, accuracy and pixels; detection: COCO AP);
* ``confusion_matrix.csv`` / ``.png``: counts ``[true, predicted]`` over the examples
  (segmentation: over the pixels);
* ``hardest_examples.png`` / ``.csv``: the examples with the lowest probability on their true
  label (segmentation: the lowest pixel accuracy; detection: the lowest F1 of boxes found
  against boxes missed and false detections, drawn with the ground truth and the
  detections), with their file (file sources)
  and their row in the split as sliced: with ``test[:20%]`` of arrays or IDX files, the row of
  the slice (:func:`vision_jax.data.apply_slice` of the unsliced split's columns gives the same
  rows);
* ``precision_recall.png`` / ``.csv``: detection's precision at each recall, IoU 0.5
  (pycocotools' curves: the mean over classes, column ``mean``, and each class where there
  are at most 10, columns ``class:<name>``);
* ``results.csv``: a task of one's own (no evaluator in :mod:`vision_jax.report.tasks`): the
  evaluation results its run recorded for the step shown (``eval/...``, ``val/...``, the best
  checkpoint's ``best/eval/...``), from the event files.

The figures come from the run's own model and evaluation pipeline on its evaluation split
(``config.data.eval_split``), in one process: from the training command's final evaluation
when it made them (:class:`~vision_jax.report.tasks.FinalEvaluation`), else from predicting the
split again with the saved variables. Per-task evaluators live in
:mod:`vision_jax.report.tasks`.
"""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np

from vision_jax import data as data_lib
from vision_jax.report import page
from vision_jax.report.curves import plot_curves, read_scalars
from vision_jax.report.figures import confusion_figure, curves_figure, hardest_figure
from vision_jax.report.tables import Table, write_confusion, write_table
from vision_jax.report.tasks import EVALUATORS, Evaluation, FinalEvaluation, evaluate
from vision_jax.tasks import library_kind
from vision_jax.trained import Trained, load_split, load_trained
from vision_jax.weights.run_dir import BEST_DIR, read_selection

logger = logging.getLogger(__name__)

CURVES, PER_CLASS = "training_curves.png", "per_class.csv"
CONFUSION_CSV, CONFUSION_PNG = "confusion_matrix.csv", "confusion_matrix.png"
HARDEST_CSV, HARDEST_PNG = "hardest_examples.csv", "hardest_examples.png"
PR_CSV, PR_PNG = "precision_recall.csv", "precision_recall.png"
HTML, RESULTS = "report.html", "results.csv"
# What an evaluation wrote: a report holding one is not replaced by one without.
EVALUATED = (PER_CLASS, CONFUSION_CSV, HARDEST_CSV)
REPORT_DIR = "report"  # the report's folder in the workdir, by default
OUTPUTS = (CURVES, PER_CLASS, CONFUSION_CSV, CONFUSION_PNG, HARDEST_CSV, HARDEST_PNG, PR_CSV,
           PR_PNG, RESULTS, HTML)  # fmt: skip


def write_report(
    workdir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    which: str = "best",
    *,
    ema: bool | None = None,
    hardest: int = 16,
    arrays: dict | None = None,
    final: FinalEvaluation | None = None,
) -> str:
    """Writes the report of the run in ``workdir`` (its ``which`` step: "best" or "latest")
    and returns the path of ``report.html``. ``ema``: its EMA parameters or not
    (:func:`~vision_jax.trained.load_trained`); ``hardest``: how many hardest examples to show;
    ``arrays``: the splits of a ``data.source="arrays"`` run (as given to training); ``final``:
    the training's final evaluation, used if it evaluated that step's checkpoint with as many
    hardest examples. A run without event files has no curves; one whose evaluation split cannot be
    loaded has curves only; the page says why, unless ``output`` holds a report with an
    evaluation already: that one is kept, and :class:`ReportError` says why."""
    if hardest < 0:
        raise ValueError(f"hardest must be >= 0 (examples to show), got {hardest}.")
    trained = load_trained(workdir, which=which, ema=ema)
    out = pathlib.Path(output) if output is not None else pathlib.Path(workdir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    evaluation = None
    if final is not None and final.hardest == hardest and not trained.ema:
        evaluation = final.evaluation(trained.step_dir)
    own_task = EVALUATORS.get(library_kind(trained.task)) is None
    if not own_task and evaluation is None:
        evaluation = _evaluation(trained, hardest, arrays, notes, out)
    for name in OUTPUTS:  # nothing stale from an earlier report
        (out / name).unlink(missing_ok=True)
    sections = _curves_section(workdir, trained.task.headline, out, notes)
    if own_task:
        sections += _results_section(workdir, trained.step, out, notes)
    facts = [f"task {trained.task.name}", f"model {trained.spec.model_name}", _step(trained)]
    if evaluation is not None:
        sections += _evaluation_sections(evaluation, trained.class_names, out)
        notes += evaluation.notes
        facts.append(
            f"{trained.task.headline} {evaluation.headline:.4f} on {evaluation.examples} "
            f"{trained.spec.data.eval_split} examples"
        )
    if notes:
        sections.append(("Notes", "".join(page.paragraph(n) for n in notes)))
    title = pathlib.Path(workdir).absolute().name
    # File names that are not UTF-8 keep the file system's bytes, as in the CSV tables.
    html = page.page(title, facts, sections)
    (out / HTML).write_text(html, encoding="utf-8", errors="surrogateescape")
    logger.info("Report of %s written to %s", workdir, out / HTML)
    return str(out / HTML)


def _step(trained: Trained) -> str:
    """Which step the report shows: a best step with the validation figure it was selected on
    (its selection record's); a latest step short of the run's length says so (a run stopped
    or still training)."""
    best = pathlib.Path(trained.step_dir).parent.name == BEST_DIR
    total = trained.record.total_steps
    of = f" of {total}" if not best and total and trained.step < total else ""
    selection = read_selection(trained.step_dir) if best else {}
    value = selection.get("best_value")
    notes = [f"{selection['metric']} {value:.4g}"] if value is not None else []
    notes += ["EMA parameters"] if trained.ema else []
    details = f" ({'; '.join(notes)})" if notes else ""
    return f"{'best' if best else 'latest'} step {trained.step}{of}{details}"


def _curves_section(
    workdir: str | os.PathLike, headline: str, out: pathlib.Path, notes: list[str]
) -> list[tuple[str, str]]:
    """The training curves' section (none, with a note, when the run has no scalars)."""
    if plot_curves(read_scalars(workdir, headline), headline, out / CURVES):
        return [("Training curves", page.image(out / CURVES, "training curves"))]
    notes.append(f"No training curves: no TensorBoard scalars in {workdir}.")
    return []


def _results_section(
    workdir: str | os.PathLike, step: int, out: pathlib.Path, notes: list[str]
) -> list[tuple[str, str]]:
    """The evaluation results the run recorded for ``step`` (its event files' scalars of that
    step but the training's), written to ``results.csv``; none, with a note, when it has none."""
    found = [
        [tag, float(values[steps == step][-1])]
        for tag, (steps, values) in read_scalars(workdir).items()
        if not tag.startswith("train/") and (steps == step).any()
    ]
    if not found:
        notes.append(f"No evaluation results: the run's event files record none for step {step}.")
        return []
    write_table(Table(("result", "value"), found, []), out / RESULTS)
    shown = Table(("result", "value"), [[tag, f"{value:.6g}"] for tag, value in found], [])
    caption = f"What the run's evaluations recorded for step {step}"
    if any(tag.startswith("best/") for tag, _ in found):
        caption += " (best/...: the best checkpoint's, on the evaluation split)"
    return [("Evaluation results", page.paragraph(caption + ".") + page.table(shown))]


class ReportError(RuntimeError):
    """The report cannot be written without losing a better one (its evaluation)."""


def _evaluation(
    trained: Trained, hardest: int, arrays: dict | None, notes: list[str], out: pathlib.Path
) -> Evaluation | None:
    """The task's evaluation, or None with the reason added to ``notes``; a split that cannot
    be loaded raises :class:`ReportError` when ``out`` holds an evaluated report (a standalone
    report run where the data is not, a relative data path from another directory: the page
    without figures would replace the one with them)."""
    split = trained.spec.data.eval_split
    try:
        source = load_split(trained, split, arrays=arrays)
    except (data_lib.DataError, OSError) as e:
        reason = f"the split {split!r} could not be loaded: {e}"
        if evaluated := [name for name in EVALUATED if (out / name).exists()]:
            raise ReportError(
                f"Not writing a report without evaluation over the one in {out} "
                f"({', '.join(evaluated)} kept): {reason}"
            ) from None
        notes.append(f"No evaluation: {reason}")
        return None
    evaluation = evaluate(trained, source, hardest)
    if evaluation is None:
        notes.append(f"Per-class figures are not available for the task {trained.task.name!r}.")
    return evaluation


def _evaluation_sections(
    evaluation: Evaluation, class_names: list[str], out: pathlib.Path
) -> list[tuple[str, str]]:
    """Writes the evaluation's files and returns its (heading, HTML) sections."""
    sections = []
    if evaluation.table is not None:
        write_table(evaluation.table, out / PER_CLASS)
        sections.append(("Per-class metrics", page.table(evaluation.table)))
    if evaluation.confusion is not None:
        write_confusion(evaluation.confusion, class_names, out / CONFUSION_CSV)
        confusion_figure(evaluation.confusion, class_names, out / CONFUSION_PNG)
        caption = page.paragraph(f"Rows: true class; columns: predicted ({evaluation.unit}).")
        image = page.image(out / CONFUSION_PNG, "confusion matrix")
        sections.append(("Confusion matrix", caption + image))
    if evaluation.hardest:
        write_table(evaluation.hardest_table, out / HARDEST_CSV)
        hardest_figure(evaluation.hardest, out / HARDEST_PNG)
        image = page.image(out / HARDEST_PNG, "hardest examples")
        body = page.paragraph(evaluation.hardest_caption) + image
        sections.append(("Hardest examples", body + page.table(evaluation.hardest_table)))
    if evaluation.pr_mean is not None:
        sections.append(_pr_section(evaluation, out))
    return sections


def _pr_section(evaluation: Evaluation, out: pathlib.Path) -> tuple[str, str]:
    """Writes the precision-recall curves' table and figure (the mean ``mean``, each class's
    ``class:<name>``: a class named "mean" or "recall" is its own column); returns their
    section."""
    recall, mean = evaluation.pr_mean
    curves = {"mean": (recall, mean)}
    curves |= {f"class:{name}": curve for name, curve in evaluation.pr_curves.items()}
    rows = np.column_stack([recall, *(precision for _, precision in curves.values())])
    write_table(Table(("recall", *curves), rows.tolist(), []), out / PR_CSV)
    title = "precision at IoU 0.5"
    curves_figure({title: curves}, out / PR_PNG, xlabel="recall")
    caption = "pycocotools' precision at each recall threshold, IoU 0.5, every area, 100 "
    caption += "detections an image (its interpolated precision: 0 past the highest recall)."
    return "Precision-recall", page.paragraph(caption) + page.image(out / PR_PNG, title)


__all__ = ["FinalEvaluation", "ReportError", "write_report"]

"""The evaluation report: tables shaped like the paper's, plots, Markdown and HTML.

Tables are built once as plain rows and rendered twice (Markdown for the repository,
HTML with the PNGs embedded so the single file can be mailed or opened offline). Every
number is "mean ± std" over the splits, the paper's format; the best mean of each column
is in bold, BulkRNABert arms and baselines alike, so a baseline that wins is visible.
"""

from __future__ import annotations

import base64
import html
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bulkfm.errors import BulkfmError
from bulkfm.evaluate.plots import (
    confusion_figure,
    per_cohort_figure,
    save_png,
    scores_figure,
    similarity_figure,
)
from bulkfm.evaluate.results import ClassificationArm, EvaluationResult, KaplanMeier, SurvivalArm
from bulkfm.io import write_text

if TYPE_CHECKING:
    from bulkfm.evaluate.config import EvaluateConfig

logger = logging.getLogger(__name__)

__all__ = ["Table", "fmt_mean_std", "report_tables", "report_title", "write_report"]

CLASSIFICATION_METRICS = (
    ("macro_f1", "macro-F1"),
    ("weighted_f1", "weighted-F1"),
    ("accuracy", "accuracy"),
)
SURVIVAL_METRICS = (
    ("c_index", "C-index"),
    ("c_index_weighted", "weighted"),
    ("c_index_macro", "macro"),
)


def fmt_mean_std(stat: dict[str, Any] | None, digits: int = 3) -> str:
    """``0.912 ± 0.013``; ``n/a`` when undefined; the std is left out with one value."""
    if not stat or stat.get("mean") is None or _nan(stat["mean"]):
        return "n/a"
    text = f"{stat['mean']:.{digits}f}"
    std = stat.get("std")
    if std is not None and not _nan(std):
        text += f" ± {std:.{digits}f}"
    return text


def _nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        def cell(text: str, tag: str) -> str:
            bold = text.startswith("**") and text.endswith("**")
            body = html.escape(text.strip("*") if bold else text)
            return f"<{tag}>{'<b>' + body + '</b>' if bold else body}</{tag}>"

        head = "".join(cell(c, "th") for c in self.columns)
        body = "".join("<tr>" + "".join(cell(v, "td") for v in row) + "</tr>" for row in self.rows)
        note = f"<p>{html.escape(self.note)}</p>" if self.note else ""
        return f"<h3>{html.escape(self.title)}</h3>{note}<table><tr>{head}</tr>{body}</table>"


def _metric_table(
    title: str, arms: dict[str, Any], metrics: Sequence[tuple[str, str]], note: str = ""
) -> Table:
    present = [(k, name) for k, name in metrics if any(k in a["summary"] for a in arms.values())]
    best = {}
    for key, _ in present:
        means = [a["summary"].get(key, {}).get("mean") for a in arms.values()]
        finite = [m for m in means if not _nan(m)]
        best[key] = max(finite) if finite else None
    rows = []
    for arm in arms.values():
        row = [arm["label"]]
        for key, _ in present:
            stat = arm["summary"].get(key)
            text = fmt_mean_std(stat)
            if stat and best[key] is not None and stat.get("mean") == best[key]:
                text = f"**{text}**"
            row.append(text)
        rows.append(row)
    return Table(title, ["Model", *[name for _, name in present]], rows, note)


def _split_words(results: dict[str, Any], task: str) -> str:
    """``"5 patient-grouped 80/20 splits"`` from the splits and the config that made them."""
    n = len(results.get("splits", {}).get(task, []))
    test = results.get("config", {}).get("protocol", {}).get("test_size")
    shape = "hold-out"
    if test is not None:
        shape = f"{round(100 * (1 - float(test)))}/{round(100 * float(test))}"
    return f"{n} patient-grouped {shape} split{'s' if n != 1 else ''}"


def _survival_scope(results: dict[str, Any]) -> str:
    """ "Pan-cancer survival" over several cohorts, plain "Survival" within one."""
    per_cohort = results["data"].get("survival", {}).get("per_cohort", {})
    return "Pan-cancer survival" if len(per_cohort) > 1 else "Survival"


def report_title(results: dict[str, Any]) -> str:
    """A heading derived from the data: what was classified and predicted, in how many
    classes and samples (so it cannot go stale when the data change)."""
    return "BulkRNABert evaluation: " + _data_words(results)


def _data_words(results: dict[str, Any]) -> str:
    """``"8 cohort classes, 420 samples; survival of 415 samples with 140 events"``."""
    data = results["data"]
    label = results["config"]["data"]["label_key"]
    parts = []
    classes = data.get("classes")
    if classes:
        parts.append(f"{len(classes)} {label} classes, {sum(classes.values())} samples")
    surv = data.get("survival")
    if surv:
        parts.append(f"survival of {surv['n']} samples with {surv['n_events']} events")
    if not parts:
        parts.append(f"{data['n_selected']} samples")
    return "; ".join(parts)


def report_tables(results: dict[str, Any]) -> list[Table]:
    """Every table of the report, in order, from a results dict (results.json)."""
    tables: list[Table] = []
    if results.get("classification"):
        classes = results["data"].get("classes", {})
        total = sum(classes.values())
        shares = [n / total for n in classes.values()] if total else []
        largest = max(shares, default=math.nan)
        k = len(shares)
        guessing = sum(2 * p / (k * p + 1) for p in shares) / k if k else math.nan
        tables.append(
            _metric_table(
                f"Classification of {results['config']['data']['label_key']} "
                f"({len(classes)} classes, {sum(classes.values())} samples)",
                results["classification"],
                CLASSIFICATION_METRICS,
                f"Test scores, mean ± std over {_split_words(results, 'classification')} "
                "stratified by class; every model saw the same splits. Chance level: "
                f"accuracy {largest:.3f} by always predicting the largest class; macro-F1 "
                f"{guessing:.3f} by guessing each class with probability 1/{k} (its "
                "large-sample value).",
            )
        )
    if results.get("survival"):
        surv = results["data"]["survival"]
        few = (surv.get("test_events") or {}).get("few", [])
        note = (
            f"Mean ± std over {_split_words(results, 'survival')} stratified by the event. "
            "C-index over the whole test set; weighted = per-cohort C-indexes weighted by "
            "cohort test size; macro = their plain mean. Chance: 0.5."
        )
        if few:
            note += " Few events: " + " ".join(f"{line}." for line in few)
        tables.append(
            _metric_table(
                f"{_survival_scope(results)} ({surv['n']} samples, {surv['n_events']} events)",
                results["survival"],
                SURVIVAL_METRICS,
                note,
            )
        )
        if len(surv.get("per_cohort", {})) > 1:
            tables.append(_per_cohort_table(results["survival"], surv))
    if results.get("per_cohort_survival"):
        tables.append(_cohort_models_table(results["per_cohort_survival"]))
    if results.get("transfer"):
        tables.append(_transfer_table(results["transfer"], results["survival"]))
    if results.get("robustness"):
        tables.append(_robustness_table(results["robustness"]))
    return tables


def _per_cohort_table(arms: dict[str, Any], surv: dict[str, Any]) -> Table:
    cohorts = sorted({c for a in arms.values() for c in a.get("per_cohort", {})})
    per_split = (surv.get("test_events") or {}).get("per_cohort", {})
    rows = [
        [
            c,
            str(min(per_split[c])) if per_split.get(c) else "",
            *[fmt_mean_std(a["per_cohort"].get(c)) for a in arms.values()],
        ]
        for c in cohorts
    ]
    return Table(
        f"Per-cohort C-index of the pan-cancer models ({len(cohorts)} cohorts)",
        ["Cohort", "fewest test events", *[a["label"] for a in arms.values()]],
        rows,
        "Cohorts without events or comparable pairs in a test split are skipped for that "
        "split. 'fewest test events': the fewest events of the cohort in one test split; a "
        "C-index on a handful of events is imprecise.",
    )


def _cohort_models_table(per_cohort: dict[str, Any]) -> Table:
    rows = []
    labels: list[str] = []
    for entry in per_cohort["cohorts"].values():
        for arm in entry["arms"].values():
            if arm["label"] not in labels:
                labels.append(arm["label"])
    for cohort, entry in per_cohort["cohorts"].items():
        by_label = {a["label"]: a for a in entry["arms"].values()}
        fewest = entry.get("min_test_events")
        rows.append(
            [
                cohort,
                str(entry["n"]),
                str(entry["n_events"]),
                "" if fewest is None else str(fewest),
                *[
                    fmt_mean_std(by_label.get(lab, {}).get("summary", {}).get("c_index"))
                    for lab in labels
                ],
            ]
        )
    for cohort, reason in per_cohort.get("skipped", {}).items():
        rows.append([cohort, "", "", "", *(["skipped: " + reason] + [""] * (len(labels) - 1))])
    return Table(
        f"Per-cohort survival models ({len(per_cohort['cohorts'])} cohorts, each trained and "
        "tested within itself)",
        ["Cohort", "n", "events", "fewest test events", *labels],
        rows,
    )


def _transfer_table(transfer: dict[str, Any], survival: dict[str, Any]) -> Table:
    rows = []
    for cohort, arms in transfer.items():
        for arm, scores in arms.items():
            rows.append(
                [
                    cohort,
                    survival.get(arm, {}).get("label", arm),
                    fmt_mean_std(scores.get("pan_cancer")),
                    fmt_mean_std(scores.get("without_cohort")),
                    fmt_mean_std(scores.get("cohort_only")),
                ]
            )
    return Table(
        "Transfer: C-index on one cohort's test samples",
        ["Cohort", "Model", "pan-cancer", "trained without the cohort", "cohort only"],
        rows,
        "Same test samples in each row: the pan-cancer splits' test samples of that cohort.",
    )


def _robustness_table(rob: dict[str, Any]) -> Table:
    rows = []
    for fraction, entry in rob["fractions"].items():
        row = [f"{float(fraction):.0%}", fmt_mean_std(entry["clean_macro_f1"])]
        for variant in ("imputed", "masked", "zero"):
            v = entry.get(variant)
            row.append(
                "n/a"
                if v is None
                else f"{fmt_mean_std(v['macro_f1'])} (ratio {fmt_mean_std(v['ratio'])})"
            )
        rows.append(row)
    return Table(
        f"Missing-gene robustness (frozen embeddings + {rob['head'].upper()} head)",
        [
            "genes removed",
            "clean macro-F1",
            "imputed by the model",
            "left out ([MASK])",
            "set to 0 TPM",
        ],
        rows,
        "A fraction of the model's genes measured in the data is removed from the test "
        "samples only; ratio = macro-F1 / clean macro-F1 per split.",
    )


# --------------------------------------------------------------------------- plots
def _best(
    arms: Mapping[str, ClassificationArm | SurvivalArm], kind: str, metric: str
) -> str | None:
    scored = [(a.summary.get(metric, {}).get("mean"), k) for k, a in arms.items() if a.kind == kind]
    scored = [(m, k) for m, k in scored if not _nan(m)]
    return max(scored)[1] if scored else None


def _scores(
    arms: Mapping[str, ClassificationArm | SurvivalArm], metric: str
) -> dict[str, tuple[float, float]]:
    """label -> (mean, std) of ``metric`` for the arms that have a finite mean."""
    out = {}
    for arm in arms.values():
        stat = arm.summary.get(metric) or {}
        if not _nan(stat.get("mean")):
            out[arm.label] = (float(stat["mean"]), float(stat.get("std") or math.nan))
    return out


def _plots(result: EvaluationResult, plot_dir: Path) -> list[tuple[str, Path]]:
    made: list[tuple[str, Path]] = []
    clf = result.classification_arms or {}
    classes = result.data.classes or {}
    accuracy = _scores(clf, "accuracy")
    if accuracy and classes:
        largest = max(classes.values()) / sum(classes.values())
        fig = scores_figure(
            accuracy,
            "accuracy",
            largest,
            f"largest class ({largest:.2f})",
            f"Classification of {len(classes)} classes, {sum(classes.values())} samples",
        )
        made.append(("Classification accuracy", save_png(fig, plot_dir / "accuracy.png")))
    surv_counts = result.data.survival
    c_index = _scores(result.survival_arms or {}, "c_index")
    if c_index and surv_counts is not None:
        fig = scores_figure(
            c_index,
            "C-index",
            0.5,
            "chance (0.5)",
            f"Survival: {surv_counts.n} samples, {surv_counts.n_events} events",
        )
        made.append(("Survival C-index", save_png(fig, plot_dir / "c_index.png")))
    for kind in ("bulkrnabert", "baseline"):
        key = _best(clf, kind, "macro_f1")
        if key is not None:
            arm = clf[key]
            fig = confusion_figure(arm.confusion, arm.labels, f"{arm.label} (all test splits)")
            made.append(
                (
                    f"Confusion matrix: {arm.label}",
                    save_png(fig, plot_dir / f"confusion_{key}.png"),
                )
            )
    surv = result.survival_arms or {}
    for kind in ("bulkrnabert", "baseline"):
        key = _best(surv, kind, "c_index")
        if key is not None:
            path = _km_plot(result, key, surv[key].label, plot_dir)
            if path is not None:
                made.append((f"Kaplan–Meier by predicted risk: {surv[key].label}", path))
    per_cohort = {
        a.label: {c: (s["mean"], s["std"]) for c, s in a.per_cohort.items() if not _nan(s["mean"])}
        for a in surv.values()
    }
    if any(per_cohort.values()):
        n_cohorts = len({c for scores in per_cohort.values() for c in scores})
        fig = per_cohort_figure(
            per_cohort, f"Per-cohort C-index of the pan-cancer models ({n_cohorts} cohorts)"
        )
        made.append(("Per-cohort C-index", save_png(fig, plot_dir / "per_cohort_cindex.png")))
    sim = result.similarity
    if sim is not None:
        centred = "centred " if sim.centered else ""
        fig = similarity_figure(
            sim.labels,
            sim.cosine,
            sim.linkage,
            f"Cosine similarity of {centred}mean embeddings ({len(sim.labels)} classes)",
        )
        made.append(
            (
                "Cohort similarity of mean BulkRNABert embeddings",
                save_png(fig, plot_dir / "similarity.png"),
            )
        )
    return made


def _km_plot(result: EvaluationResult, key: str, label: str, plot_dir: Path) -> Path | None:
    """KM curves of the median risk groups, pooling all test splits: risks of different
    splits come from different models, so each is turned into its within-split percentile
    first and the pooled percentiles are cut at their median."""
    from bulkfm.tasks.survival import risk_groups_km  # sklearn, lifelines

    pred = result.survival[key].predictions
    if pred.empty:
        return None
    pct = pred.groupby("split")["risk"].rank(pct=True).to_numpy()
    try:
        groups = risk_groups_km(
            pred["time"].to_numpy(), pred["event"].to_numpy(), pct, plot=True, title=label
        )
    except BulkfmError as exc:
        logger.warning("no Kaplan–Meier plot for %s: %s", label, exc)
        return None
    result.km[key] = KaplanMeier(
        logrank=groups.logrank,
        groups=groups.table.reset_index().to_dict(orient="records"),
    )
    assert groups.figure is not None  # plot=True
    return save_png(groups.figure, plot_dir / f"km_{key}.png")


# --------------------------------------------------------------------------- documents
def _exclusion_items(data: dict[str, Any]) -> list[str]:
    """The exclusions as sentences whose counts add up: the steps from the loaded to the
    analysed samples partition the difference (one line with the sum), and the per-task
    exclusions, which act on the analysed samples, say which task they concern."""
    excl = data.get("exclusions", {})
    steps: list[tuple[str, int]] = []
    select = excl.get("select")
    if select and select["n_before"] > select["n_after"]:
        steps.append((f"not matching {select['rules']}", select["n_before"] - select["n_after"]))
    dedupe = excl.get("dedupe")
    if dedupe:
        examples = ", ".join(dedupe["examples"][:2])
        steps.append(
            (f"duplicate {dedupe['key']} (the first kept; e.g. {examples})", dedupe["n_dropped"])
        )
    if excl.get("unlabelled"):
        steps.append(("without a label", excl["unlabelled"]))
    if excl.get("no_embedding"):
        steps.append(("without a precomputed embedding", excl["no_embedding"]))
    items = []
    n_loaded, n_selected = data["n_loaded"], data["n_selected"]
    if steps:
        parts = " + ".join(f"{n} {what}" for what, n in steps)
        items.append(
            f"{n_loaded} loaded, {n_selected} analysed: {n_loaded - n_selected} left out = {parts}"
        )
    if excl.get("small_classes"):
        n = excl.get("small_class_samples")
        items.append(
            "classification only"
            + (f", {n} sample(s)" if n is not None else "")
            + ": classes too small for the splits: "
            + "; ".join(f"{c} ({r})" for c, r in excl["small_classes"].items())
        )
    surv = excl.get("survival")
    if surv:
        reasons = surv.get("by_reason") or {}
        why = " + ".join(f"{n} {r}" for r, n in reasons.items()) or surv["reason"]
        items.append(f"survival only: {surv['n_excluded']} sample(s) left out = {why}")
    known = {"select", "dedupe", "unlabelled", "no_embedding", "small_classes"}
    known |= {"small_class_samples", "survival"}
    items += [f"{key}: {value}" for key, value in excl.items() if key not in known]
    return items


def _lists(res: dict[str, Any]) -> list[tuple[str, list[str]]]:
    items = _exclusion_items(res["data"])
    stages: dict[str, float] = {}
    for key, seconds in res.get("timings_s", {}).items():
        stage = key.split("/")[0]
        stages[stage] = stages.get(stage, 0.0) + seconds
    timings = [", ".join(f"{k} {v:.1f} s" for k, v in stages.items())] if stages else []
    return [
        ("Notes", list(res.get("notes", []))),
        ("Exclusions", items),
        ("Warnings", list(res.get("warnings", []))),
        ("Timings", timings),
    ]


def _header(res: dict[str, Any], title: str) -> list[str]:
    model = res.get("model", {})
    lines = [f"# {title}", ""]
    desc = model.get("path") or model.get("source", "")
    if "n_genes" in model:
        blocks = f"{model['num_layers']} block{'s' if model['num_layers'] != 1 else ''}"
        desc += (
            f" ({blocks}, {model['embed_dim']}-d, {model['n_genes']} genes, "
            f"{model['n_parameters']:,} parameters)"
        )
    if title != report_title(res):  # a title of the user's: the data's counts below it
        lines.append(f"- data: {_data_words(res)}")
    lines.append(f"- model: {desc}")
    pre = model.get("eval")
    if pre:
        lines.append(
            f"- pre-training here: {model.get('steps')} steps; held-out masked-gene accuracy "
            f"{pre.get('eval_acc', math.nan):.3f} vs {pre.get('trivial_acc', math.nan):.3f} for "
            "the per-gene most frequent bin"
        )
    lines.append(
        f"- samples: {res['data']['n_selected']} selected of {res['data']['n_loaded']} loaded"
    )
    coverage = res.get("gene_coverage")
    if coverage:
        line = (
            f"- gene coverage: the samples measure {coverage['fraction_measured']:.1%} of the "
            f"model's {coverage['n_model_genes']} genes on average"
        )
        if coverage["n_absent"]:
            line += (
                f"; {coverage['n_absent']} are absent from the data and read as [MASK] "
                f"(e.g. {', '.join(coverage['examples_absent'][:3])})"
            )
        groups = coverage.get("by_group", {})
        for column, entries in groups.items():
            if len(entries) > 1:
                low = min(entries.items(), key=lambda kv: kv[1]["fraction_measured"])
                line += f"; lowest {column}: {low[0]} {low[1]['fraction_measured']:.1%}"
        lines.append(line + f" (minimum allowed {coverage['min_coverage']:.0%})")
    lines.append("")
    return lines


def write_report(result: EvaluationResult, config: EvaluateConfig) -> dict[str, Path]:
    """report.md (+ report.html with embedded PNGs, + plots/*.png) in the output folder."""
    out = result.out_dir
    plots = _plots(result, out / "plots") if config.report.plots else []
    res = result.results  # after the plots: the KM plots add their log-rank results
    tables = report_tables(res)
    sim = res.get("similarity")
    title = config.report.title or report_title(res)
    md = _header(res, title)
    md += [t.markdown() for t in tables]
    if sim:
        md.append(f"Dendrogram leaf order of the mean embeddings: {', '.join(sim['order'])}\n")
    for caption, path in plots:
        md.append(f"![{caption}](plots/{path.name})\n")
    for title, items in _lists(res):
        if items:
            md += [f"### {title}", "", *[f"- {i}" for i in items], ""]
    paths = {"report_md": write_text("\n".join(md) + "\n", out / "report.md")}
    if config.report.html:
        paths["report_html"] = write_text(_html(res, title, tables, plots), out / "report.html")
    for _caption, path in plots:
        paths[f"plot_{path.stem}"] = path
    return paths


def _html(
    res: dict[str, Any], title: str, tables: list[Table], plots: list[tuple[str, Path]]
) -> str:
    header = _header(res, title)
    intro = "".join(f"<li>{html.escape(line[2:])}</li>" for line in header if line.startswith("- "))
    body = [f"<h1>{html.escape(title)}</h1><ul>{intro}</ul>", *[t.html() for t in tables]]
    for caption, path in plots:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        body.append(
            f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    for name, items in _lists(res):
        if items:
            body.append(
                f"<h3>{html.escape(name)}</h3><ul>"
                + "".join(f"<li>{html.escape(i)}</li>" for i in items)
                + "</ul>"
            )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em;}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;}"
        "img{max-width:100%;}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )

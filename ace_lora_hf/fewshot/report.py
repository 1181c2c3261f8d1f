"""The results of a few-shot run: mean and standard deviation over seeds per method and K (or share), as a CSV table,
JSON (with every seed's record) and a plot of a metric against K; the shots drawn as a CSV table."""

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..data.csv_cells import write_header, write_rows
from ..outputs.safe_outputs import write_json_atomic
from .runner import FewShotResults


METRICS = ("accuracy", "auc")
SUMMARY_COLUMNS = ("method", "shots", "fraction", "runs", *(f"{metric}_{kind}" for metric in METRICS
                                                           for kind in ("mean", "std")), "C")
SHOT_COLUMNS = ("shots", "fraction", "seed", "image", "label", "line")
RESULTS_CSV, RESULTS_JSON, RESULTS_PLOT, SHOTS_CSV = "results.csv", "results.json", "results.png", "shots.csv"


def summarise(records: Sequence[dict]) -> list[dict]:
    """One row per method and setting: the number of runs (seeds), each metric's mean and standard deviation over
    them (population, ddof 0; 0 for the single zero-shot run), and the linear probe's C per seed (`;`-joined where the
    seeds chose different values)."""
    frame = pd.DataFrame(list(records)).astype({"shots": "Int64", "fraction": "Float64"})
    rows = []
    for (method, shots, fraction), group in frame.groupby(["method", "shots", "fraction"], dropna=False, sort=False):
        row = {"method": method, "shots": None if pd.isna(shots) else int(shots),
               "fraction": None if pd.isna(fraction) else float(fraction), "runs": len(group)}
        for metric in METRICS:
            row[f"{metric}_mean"] = float(group[metric].mean())
            row[f"{metric}_std"] = float(group[metric].std(ddof=0))
        if "C" in group and group["C"].notna().any():
            row["C"] = ";".join(f"{value:g}" for value in dict.fromkeys(group["C"]))
        rows.append(row)
    return rows


def write_results(folder: Path, results: FewShotResults, run: dict, plot_metric: str | None) -> list[Path]:
    """Write the results into `folder` (a fresh, staged folder): see the module's docstring. `run` (model, tables,
    plan) heads the JSON; `plot_metric` None draws no plot. Returns the files written."""
    summary = summarise(results.records)
    _write_csv(folder / RESULTS_CSV, SUMMARY_COLUMNS, summary)
    _write_csv(folder / SHOTS_CSV, SHOT_COLUMNS, results.shots)
    write_json_atomic(folder / RESULTS_JSON, {**run, "summary": summary, "runs": results.records})
    written = [folder / RESULTS_CSV, folder / RESULTS_JSON, folder / SHOTS_CSV]
    if plot_metric is not None:
        plot_summary(summary, plot_metric).savefig(folder / RESULTS_PLOT)
        written.append(folder / RESULTS_PLOT)
    return written


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as file:
        write_header(file, columns)
        write_rows(file, columns, [{key: "" if value is None else value for key, value in row.items()}
                                   for row in rows])


def plot_summary(summary: Sequence[dict], metric: str):
    """`metric` (mean with a standard-deviation bar) against K or the share, one line per method; the zero-shot
    baseline as a dashed line. Needs matplotlib."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=150, layout="constrained")
    axes = figure.add_subplot()
    by_share = any(row["fraction"] is not None for row in summary)
    for method in dict.fromkeys(row["method"] for row in summary):
        rows = [row for row in summary if row["method"] == method]
        if rows[0]["shots"] == 0:
            axes.axhline(rows[0][f"{metric}_mean"], linestyle="--", color="gray", label=method)
            continue
        x = [row["fraction"] if by_share else row["shots"] for row in rows]
        axes.errorbar(x, [row[f"{metric}_mean"] for row in rows], yerr=[row[f"{metric}_std"] for row in rows],
                      marker="o", capsize=3, label=method)
    axes.set_xscale("log", base=10 if by_share else 2)
    axes.set_xlabel("share of the training table" if by_share else "shots per class (K)")
    axes.set_ylabel(metric)
    axes.legend()
    return figure


__all__ = ["METRICS", "RESULTS_CSV", "RESULTS_JSON", "RESULTS_PLOT", "SHOTS_CSV", "plot_summary", "summarise",
           "write_results"]

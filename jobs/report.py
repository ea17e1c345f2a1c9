"""`vaewatch report`: one self-contained HTML page about the committed output.

Plots (matplotlib, PNG embedded as data URIs, so the file can be mailed or attached to a ticket):
the score distribution with the threshold, anomalies per day, a 2-D projection of latent means
coloured by score, how often each feature is the top contributor of a flagged record, and the
latest day's most anomalous records.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vaewatch.jobs.query import (  # noqa: E402
    committed_partitions,
    connect,
    summary_by_segment,
    top_features_text,
)
from vaewatch.model.calibration.drift import findings  # noqa: E402
from vaewatch.model.errors import UserError  # noqa: E402

SAMPLE_ROWS = 100_000  # rows drawn for the distribution and projection plots
BLUE, RED = "#3b6ea5", "#c8453b"
CAPTIONS = {
    "distribution": "Anomaly score, in nats: minus the record's IWAE log-likelihood, plus a "
    "typical cost for each missing value and, in tables with both numbers and categories, the "
    "categories' and booleans' part counted discrete_weight times (docs/numbers.md, \"What the "
    'numbers mean"); '
    "red: flagged records (is_anomaly): every record above the dashed threshold, and below it "
    "those with one feature in its own tail.",
    "per_day": "Bars: flagged records per partition; line: their share of the day's records.",
    "drift": "Each day against the model's calibration sample, two findings apart. Data drift "
    "(the alarm): the bulk of the scores, those below the calibration's 90 % quantile, tested "
    "as a distribution of their own (two-sample Kolmogorov-Smirnov D), and each feature's "
    "share of the top_features of the records not flagged; an alarm when a p-value is below "
    "0.001 over the number of tests. The day's anomalies move neither. Anomaly rate (a "
    "notice): the share flagged, its 95 % interval and the budget 1 - q; marked when above "
    "the share the threshold flags in calibration. The whole distribution's KS D and its PSI "
    "over calibration deciles are descriptions: they move with the anomalies. Days committed "
    "before the split show their one alarm as it was.",
    "latent": "Latent means projected on their first two principal components ({:,} sampled "
    "records scored by {}, the model of the latest day: each model version has a latent space "
    "of its own), coloured by anomaly score; flagged records ringed in red.",
    "contributors": "For each flagged record, the feature its top_features names first: the "
    "one most unusual given the rest of the record (-log p(x_j | x_-j) over its median on the "
    "calibration data).",
    "segments": "A model trained with --segment-column judges each record against its "
    "segment's own threshold, score quantiles and drift reference (segment=VALUE); records of a "
    "value with too few validation rows, a null or a value not seen in training are judged by "
    "the global baseline (global:...). Each segment's drift is tested apart, every test at "
    "0.001 over the number of segments + 1.",
}


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)


def score_distribution(scores: np.ndarray, flagged: np.ndarray, threshold: float) -> str:
    """Stacked histogram of the sampled scores, flagged records in red."""
    fig, ax = plt.subplots(figsize=(7.5, 3.6), constrained_layout=True)
    finite = np.isfinite(scores)
    upper = max(np.quantile(scores[finite], 0.999), threshold) * 1.15
    clipped = np.clip(scores[finite], None, upper)
    flagged = flagged[finite]
    bins = np.linspace(clipped.min(), upper, 80)
    ax.hist([clipped[~flagged], clipped[flagged]], bins=bins, color=[BLUE, RED],
            label=["normal", "flagged"], stacked=True)  # fmt: skip
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
    ax.annotate(f"threshold {threshold:.1f}", (threshold, 0.95), xycoords=("data", "axes fraction"),
                xytext=(4, 0), textcoords="offset points", fontsize=9, va="top")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("anomaly score (nats; the last bin holds everything above)")
    ax.set_ylabel("records")
    ax.legend(frameon=False)
    _style(ax)
    return _png(fig)


def anomalies_per_day(days: list, rows: list[int], anomalies: list[int]) -> str:
    fig, ax = plt.subplots(figsize=(7.5, 3.2), constrained_layout=True)
    labels = [str(d) if d is not None else "all" for d in days]
    x = np.arange(len(labels))
    ax.bar(x, anomalies, color=RED, width=0.6)
    ax.set_xticks(
        x,
        labels,
        rotation=45 if len(labels) > 6 else 0,
        ha="right" if len(labels) > 6 else "center",
    )
    ax.set_ylabel("flagged records")
    twin = ax.twinx()
    rate = np.asarray(anomalies) / np.maximum(1, np.asarray(rows))
    twin.plot(x, 100 * rate, color="black", marker="o", linewidth=1.2)
    twin.set_ylabel("anomaly rate (%)")
    twin.set_ylim(0, max(1.0, 100 * rate.max() * 1.3))
    twin.spines[["top"]].set_visible(False)
    _style(ax)
    return _png(fig)


def latent_projection(latent: np.ndarray, scores: np.ndarray, flagged: np.ndarray) -> str:
    """First two principal components of the latent means, coloured by anomaly score."""
    centred = latent - latent.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    fig, ax = plt.subplots(figsize=(8.5, 4.4), constrained_layout=True)
    order = np.argsort(scores)  # anomalies drawn last, on top
    # frame the bulk of the records: a few extreme anomalies would otherwise squeeze it
    low, high = np.quantile(xy, 0.005, axis=0), np.quantile(xy, 0.995, axis=0)
    pad = 0.25 * (high - low)
    outside = int(np.sum(np.any((xy < low - pad) | (xy > high + pad), axis=1)))
    colour = np.clip(scores, None, np.quantile(scores, 0.995))
    points = ax.scatter(xy[order, 0], xy[order, 1], c=colour[order], s=4, cmap="viridis", alpha=0.7,
                        linewidths=0)  # fmt: skip
    ax.scatter(xy[flagged, 0], xy[flagged, 1], s=14, facecolors="none", edgecolors=RED,
               linewidths=0.8, label="flagged")  # fmt: skip
    fig.colorbar(points, ax=ax, label="anomaly score (nats)")
    ax.set_xlim(low[0] - pad[0], high[0] + pad[0])
    ax.set_ylim(low[1] - pad[1], high[1] + pad[1])
    ax.set_xlabel("latent PC 1" + (f"   ({outside} records outside the frame)" if outside else ""))
    ax.set_ylabel("latent PC 2")
    ax.legend(frameon=False, loc="upper right")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def top_contributors(features: list[str], counts: list[int]) -> str:
    fig, ax = plt.subplots(figsize=(7.5, 0.4 * len(features) + 1.2), constrained_layout=True)
    y = np.arange(len(features))[::-1]
    ax.barh(y, counts, color=BLUE)
    ax.set_yticks(y, features)
    ax.set_xlabel("flagged records where the feature contributes most")
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def segment_rows(con) -> list[dict]:
    """Per baseline over every day (none where the records have one baseline only): records,
    flagged, rate, and in how many days the segment's own drift test alarmed."""
    rows = summary_by_segment(con).fetchall()
    if not any((r[1] or "").startswith("segment=") for r in rows):
        return []
    out: dict[str, dict] = {}
    for _, baseline, n, anomalies, _, _, _, drift in rows:
        row = out.setdefault(baseline, {"baseline": baseline, "days": 0, "rows": 0,
                                        "anomalies": 0, "alarms": None, "assessed": 0})  # fmt: skip
        row["days"] += 1
        row["rows"] += n
        row["anomalies"] += anomalies
        if drift != "-":
            row["assessed"] += 1
            row["alarms"] = (row["alarms"] or 0) + (drift == "ALARM")
    for row in out.values():
        row["rate"] = row["anomalies"] / row["rows"]
    return sorted(out.values(), key=lambda r: r["baseline"])


def drift_rows(partitions) -> list[dict]:
    """One row per committed day: its drift assessment against the model's calibration."""
    rows = []
    for p in partitions:
        drift = p.manifest.drift
        day = str(p.day or "latest run")
        found = findings(drift)
        if not found["assessed"]:
            why = found["why"] or "not computed (an output written before drift checks)"
            rows.append({"day": day, "assessed": False, "why": why})
            continue
        rate, scores = found["anomaly_rate"], drift["scores"]
        bulk = drift.get("data_drift", {}).get("bulk_scores")
        rows.append(
            {
                "day": day,
                "assessed": True,
                "alarm": found["data_drift_alarm"],
                "rate": rate["rate"],
                "interval": rate["interval"],
                "budget": rate["budget"],
                "above_expected": rate["above_expected"],
                "bulk_ks": None if bulk is None else bulk["ks_statistic"],
                "ks": scores["ks_statistic"],
                "psi": scores["psi_deciles"],
                "reasons": found["reasons"],
            }
        )
    return rows


def build(output: str, top_n: int = 20) -> str:
    """The report's HTML for the committed output under `output`."""
    con = connect(output)
    partitions = committed_partitions(output)
    latest = partitions[-1].manifest
    threshold = latest.threshold
    per_day = con.sql(
        "SELECT dt, count(*), sum(is_anomaly::INTEGER), "
        "string_agg(DISTINCT model_version::VARCHAR, ',') FROM scores GROUP BY dt ORDER BY dt"
    ).fetchall()
    total = sum(r[1] for r in per_day)
    if not total:
        raise UserError(f"the committed output under {output!r} has no scored rows to report on")
    flagged_total = sum(r[2] for r in per_day)
    sample = con.sql(
        f"SELECT anomaly_score, is_anomaly FROM scores USING SAMPLE {SAMPLE_ROWS} ROWS"
    ).fetchnumpy()
    scores = np.asarray(sample["anomaly_score"], dtype=np.float64)
    flagged = np.asarray(sample["is_anomaly"], dtype=bool)
    # latent codes of one model only: another version's latent space (or size) is not this one's
    latest_day = per_day[-1][0]
    where = "dt = $day" if latest_day is not None else "TRUE"
    day = {"day": latest_day} if latest_day is not None else {}
    ((version,),) = con.execute(
        f"SELECT max(model_version::VARCHAR) FROM scores WHERE {where}", day
    ).fetchall()
    coded = con.sql(
        "SELECT anomaly_score, is_anomaly, latent_mean FROM (SELECT * FROM scores "
        f"WHERE model_version::VARCHAR = $version) USING SAMPLE {SAMPLE_ROWS} ROWS",
        params={"version": version},
    ).fetchnumpy()
    latent = np.stack([np.asarray(v, dtype=np.float64) for v in coded["latent_mean"]])
    latent_caption = CAPTIONS["latent"].format(len(latent), version)
    contributors = con.sql(
        "SELECT top_features[1].feature AS feature, count(*) AS n FROM scores "
        "WHERE is_anomaly AND len(top_features) > 0 GROUP BY feature ORDER BY n DESC, feature"
    ).fetchall()
    top = con.sql(
        "SELECT * EXCLUDE (latent_mean, latent_std, elbo, log_likelihood, dt) FROM scores "
        f"WHERE {where} "
        "ORDER BY anomaly_score DESC LIMIT $n",
        params={"day": latest_day, "n": top_n} if latest_day is not None else {"n": top_n},
    )
    top_columns, top_rows = top.columns, top.fetchall()

    images = {
        "distribution": score_distribution(scores, flagged, threshold),
        "per_day": anomalies_per_day(
            [r[0] for r in per_day], [r[1] for r in per_day], [r[2] for r in per_day]
        ),
        "latent": latent_projection(
            latent,
            np.asarray(coded["anomaly_score"], dtype=np.float64),
            np.asarray(coded["is_anomaly"], dtype=bool),
        ),
        "contributors": top_contributors([c[0] for c in contributors], [c[1] for c in contributors])
        if contributors
        else "",
    }
    model = latest.model
    cards = [
        ("days", str(len(per_day))),
        ("records scored", f"{total:,}"),
        ("flagged", f"{flagged_total:,} ({flagged_total / total:.2%})"),
        ("model", model.uri),
        (
            "threshold",
            f"{threshold:.2f} nats (q = {latest.threshold_quantile}, flag rule {latest.flag_rule})",
        ),
        ("IWAE samples", f"K = {latest.k}, seed {latest.seed}"),
        (
            "data-drift alarms",
            f"{sum(bool(findings(p.manifest.drift)['data_drift_alarm']) for p in partitions)} "
            f"of {len(partitions)} days",
        ),  # fmt: skip
    ]

    def cell(column, value) -> str:
        if column == "top_features":
            return top_features_text(value)
        if isinstance(value, float):
            return f"{value:,.2f}" if column != "score_percentile" else f"{value:.3f}"
        return "" if value is None else str(value)

    return _template().render(
        output=output,
        versions=sorted({r[3] for r in per_day if r[3]}),
        cards=cards,
        images=images,
        captions=CAPTIONS,
        latent_caption=latent_caption,
        drift=drift_rows(partitions),
        segments=segment_rows(con),
        latest_day=str(latest_day or "latest run"),
        top_columns=top_columns,
        top_rows=[[cell(c, v) for c, v in zip(top_columns, row, strict=True)] for row in top_rows],
    )


def _template():
    """report.html.j2 beside this module, with autoescaping: every value the page shows is
    escaped by the template engine, none by hand."""
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return environment.get_template("report.html.j2")


def write(output: str, destination: str | Path, top_n: int = 20) -> Path:
    page = build(output, top_n)
    destination = Path(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(page, encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write the report to {str(destination)!r}: {err.strerror}") from err
    return destination

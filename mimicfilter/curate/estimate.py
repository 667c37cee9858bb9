"""The votes' relative score of a pool: the share of usable samples the epoch votes keep, how far to
trust it, and what to call each figure.

* **Relative score**: the kept share of the usable (status ``ok``) samples under the per-epoch votes
  (``--binarize``, combined by ``--combine-votes``); with the default rule it was chosen by its
  worst-case error on a validation suite of unlike pools (docs/benchmarks.md). It is not called a
  quality: to a reference that never saw the pool's pairs part of the clean data scores like noise,
  and no rule over the scores alone can tell (a clean pool read 57 %). The quality estimate is the
  calibrated one (curate/calibrate.py), measured against the anchors of ``score --trusted``.
* **Uncertainty**: the same share under each other sensible binarisation (``SPREAD_RULES``);
  the interval runs from the lowest to the highest of them and the rule in use.
* **Warnings**: when those estimates disagree by more than ``DISAGREEMENT_MARGIN``, and when an
  epoch's scores show no second mode (one bump: a clean pool, or noise the reference cannot tell
  from clean data, so no rule can split it reliably).
* **Label**: the votes' kept share is a "relative score"; any other rule fixes what is kept (top-k,
  fractions, thresholds, SQL, the calibrated cut), so its kept share is a "kept fraction". Only a
  calibrated estimate is called a "quality estimate".

Torch-free; everything runs in DuckDB over the ``scores`` view and the ``samples`` table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mimicfilter.curate.duck import SAMPLE_STATUS_SQL
from mimicfilter.curate.votes import AggregateConfig, Mixture, VoteRule, dawid_skene, epoch_mixtures, vote_rule

SPREAD_RULES = ("mirror", "sign", "kmeans", "gmm")
CLUSTERING_RULES = ("kmeans", "gmm")
DISAGREEMENT_MARGIN = 0.10  # estimates further apart than this (in share of samples) → a warning
QUALITY_LABEL, RELATIVE_LABEL, KEPT_LABEL = "quality estimate", "relative score", "kept fraction"
CALIBRATE_HINT = "uncalibrated: score with --trusted CHECKED_SHARDS to measure the quality (docs/filter.md)"


@dataclass(frozen=True)
class QualityEstimate:
    """The quality estimate of a run, its interval, per-rule estimates and warnings."""

    value: float | None  # kept share of the usable samples under the vote rule
    rule: str  # the vote rule in words
    low: float | None
    high: float | None
    by_rule: dict[str, float | None]
    second_mode: dict[str, bool]  # per epoch: do the scores show a second mode?
    warnings: tuple[str, ...]

    def as_dict(self) -> dict:
        result = asdict(self)
        result["warnings"] = list(self.warnings)
        return result


def estimate_label(keep: list[str], drop: list[str]) -> str:
    """"relative score" when the votes alone decide what is kept, else "kept fraction"."""
    return RELATIVE_LABEL if list(keep) == ["keep-votes"] and not list(drop) else KEPT_LABEL


def vote_share(connection, rule: VoteRule, combine: str) -> float | None:
    """The share of usable samples whose combined vote under ``rule`` is keep (one pass over the rows)."""
    per_sample = (
        f"SELECT {SAMPLE_STATUS_SQL} = 'ok' AS usable, count(*) AS epochs, "
        "sum(CASE WHEN vote THEN 1 ELSE 0 END) AS votes, "
        "sum(CASE WHEN vote THEN (1::BIGINT << epoch::BIGINT) ELSE 0 END)::BIGINT AS pattern "
        f'FROM (SELECT shard, "index", epoch, status, coalesce({rule.sql()}, false) AS vote FROM scores) '
        'GROUP BY shard, "index"'
    )
    if combine == "majority":
        kept, usable = connection.execute(
            f"SELECT count(*) FILTER (WHERE votes * 2 > epochs), count(*) FROM ({per_sample}) WHERE usable"
        ).fetchone()
        return kept / usable if usable else None
    rows = connection.execute(f"SELECT pattern, count(*) FROM ({per_sample}) WHERE usable GROUP BY pattern").fetchall()
    if not rows:
        return None
    patterns = np.array([row[0] for row in rows], dtype=np.int64)
    counts = np.array([row[1] for row in rows], dtype=float)
    posterior = dawid_skene(patterns, counts, len(rule.thresholds))
    return float(counts[posterior > 0.5].sum() / counts.sum())


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _mixtures(connection, aggregation: dict) -> dict[int, Mixture | None]:
    """The per-epoch mixtures the vote rule fitted, or fitted now."""
    if "mixtures" in aggregation:
        return {int(epoch): Mixture.from_dict(values) if values else None
                for epoch, values in aggregation["mixtures"].items()}
    return epoch_mixtures(connection)


def estimate_quality(connection, aggregation: dict, config: AggregateConfig) -> QualityEstimate:
    """The estimate for the ``samples`` table that :func:`~mimicfilter.curate.votes.aggregate` made."""
    kept, usable = connection.execute(
        "SELECT count(*) FILTER (WHERE vote_keep), count(*) FROM samples WHERE status = 'ok'"
    ).fetchone()
    value = kept / usable if usable else None
    mixtures = _mixtures(connection, aggregation)
    second_mode = {str(epoch): mixture is not None and mixture.second_mode() for epoch, mixture in mixtures.items()}
    bimodal = bool(second_mode) and all(second_mode.values())
    by_rule: dict[str, float | None] = {config.binarize: value}
    for binarize in SPREAD_RULES:
        # the clustering rules split any single bump in two: they say nothing where there is no second mode
        if binarize not in by_rule and (bimodal or binarize not in CLUSTERING_RULES):
            by_rule[binarize] = vote_share(connection, vote_rule(connection, binarize, mixtures), config.combine_votes)
    known = [share for share in by_rule.values() if share is not None]
    low, high = (min(known), max(known)) if known else (None, None)
    rule = f"{config.binarize} per epoch, {config.combine_votes} over epochs"
    warnings = []
    if known and high - low > DISAGREEMENT_MARGIN:
        listed = ", ".join(f"{name} {_percent(share)}" for name, share in by_rule.items())
        warnings.append(f"the vote rules disagree by {100 * (high - low):.0f} points ({listed}): "
                        "read the relative score as a range")
    flat = [epoch for epoch, bimodal_epoch in second_mode.items() if not bimodal_epoch]
    if flat:
        which = "the scores show" if len(flat) == len(second_mode) else f"the scores of epoch(s) {', '.join(flat)} show"
        warnings.append(f"{which} no second mode: the pool may be clean, or its noise may look like clean data to "
                        "the reference, and no rule can tell which; the estimate is uncertain (low where the reference "
                        "never saw the pool's domain, high where it confuses the noise with clean data)")
    return QualityEstimate(value, rule, low, high, by_rule, second_mode, tuple(warnings))


def headline_fields(keep: list[str], drop: list[str], kept: int, ok: int, estimate: QualityEstimate,
                    calibrated: dict | None = None) -> dict:
    """What ``filter``'s summary.json and ``report``'s report.json both say about the kept share and
    the pool: ``headline`` (the kept share of usable samples under its right name),
    ``quality_estimate`` (the calibrated estimate; null without anchors), ``relative_score`` (the
    votes' share) and ``quality`` (the votes' range, per-rule shares, second modes and warnings,
    plus ``calibrated``: value, low, high, trusted, synthetic, signal — or null)."""
    calibrated_fields = None if calibrated is None else {
        name: calibrated[name] for name in ("value", "low", "high", "trusted", "synthetic", "signal")}
    return {
        "headline": {"label": estimate_label(keep, drop), "value": kept / ok if ok else None},
        "quality_estimate": None if calibrated is None else calibrated["value"],
        "relative_score": estimate.value,
        "quality": estimate.as_dict() | {"calibrated": calibrated_fields},
    }


def calibrated_row(calibrated: dict) -> tuple[str, str]:
    interval = f"{_percent(calibrated['low'])}–{_percent(calibrated['high'])}"
    return (f"{QUALITY_LABEL} (calibrated)", f"{_percent(calibrated['value'])} (90% interval {interval}; "
            f"{calibrated['trusted']} trusted and {calibrated['synthetic']} synthetic anchors, on {calibrated['signal']})")


def headline_rows(headline: dict, quality: dict) -> list[tuple[str, str]]:
    """The headline as (name, value) rows, worded alike in ``filter``, ``report`` and the report page.

    The kept share under its name; the calibrated quality estimate when the run has anchors; the
    votes' relative score with its range (under the votes the kept share *is* that score), and
    without anchors the line that says how to calibrate it."""
    rows = [(f"{headline['label']} (kept / usable)", _percent(headline["value"]))]
    calibrated = quality.get("calibrated")
    if calibrated:
        rows.append(calibrated_row(calibrated))
    if quality.get("value") is not None:
        spread = f"{_percent(quality['low'])}–{_percent(quality['high'])}"
        if headline["label"] == RELATIVE_LABEL:
            rows.append(("range over the vote rules", spread))
        else:
            rows.append((f"{RELATIVE_LABEL} of the pool (votes)", f"{_percent(quality['value'])} (range {spread})"))
    if not calibrated:
        rows.append(("calibration", CALIBRATE_HINT))
    return rows

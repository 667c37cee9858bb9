"""Grad-Mimic stage 2: per-epoch keep/drop votes, and one row per sample with its combined vote.

Everything runs in DuckDB over the Parquet parts, out of core: no score row becomes a Python
object. Per sample: the mean and last-epoch mimic score, the mean relative weight, the mean proxy
loss, the reference's CLIP score and loss, and per-epoch keep/drop votes from a binarisation rule:

* ``threshold``: r > 1 (the relative weight above uniform 1/B; the paper's rule);
* ``sign``: s > 0 (the sample's gradient moves the proxy toward the reference);
* ``kmeans``: two-cluster 1-D k-means of each epoch's scores (keep the upper cluster);
* ``gmm``: a two-component 1-D Gaussian mixture of each epoch's scores (keep where the upper
  component is more probable).

Votes are combined across epochs by majority, or by a Dawid–Skene label model: each epoch is an
annotator with its own sensitivity and specificity, fitted by EM. The EM runs on vote *patterns*
(at most 2^epochs of them, with counts), so it is exact and costs nothing at any scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mimicfilter.curate.duck import epoch_columns, per_sample_sql
from mimicfilter.defaults import BINARIZE_RULES, DEFAULT_BINARIZE, DEFAULT_COMBINE_VOTES, VOTE_COMBINERS
from mimicfilter.errors import MimicfilterError

MAX_EPOCHS_FOR_PATTERNS = 62  # vote patterns are BIGINT bitmasks
SECOND_MODE_DIP = 0.9  # a valley below 90 % of the lower mode's density counts as a second mode
# The mirror's lower component lying this many of its standard deviations above 0 is the lower
# shoulder of clean scores, not noise centred at or below 0. Chosen on the validation suite: every
# value from 1.25 to 1.6 gives the same readings there (1.2 reads one noisy pool as clean, 1.7 misses
# a clean pool's shoulder); 1.4 is the middle (docs/benchmarks.md)
CLEAN_SHOULDER_SDS = 1.4


@dataclass(frozen=True)
class AggregateConfig:
    binarize: str = DEFAULT_BINARIZE  # chosen by its worst case on a validation suite: docs/benchmarks.md
    combine_votes: str = DEFAULT_COMBINE_VOTES

    def __post_init__(self):
        if self.binarize not in BINARIZE_RULES:
            raise MimicfilterError(f"unknown --binarize {self.binarize!r}", hint=f"one of {', '.join(BINARIZE_RULES)}")
        if self.combine_votes not in VOTE_COMBINERS:
            raise MimicfilterError(
                f"unknown --combine-votes {self.combine_votes!r}", hint=f"one of {', '.join(VOTE_COMBINERS)}"
            )


def _mirror_threshold(connection, epoch: int, mixture: Mixture | None) -> float:
    """Drop twice the share of scores below the noise's centre: keep the top 1 - 2 P(s < c).

    A noisy sample's score is symmetric around a centre c: around 0 for a mismatched image–text
    pair (its gradient is unrelated to the direction toward the reference), lower for a flipped
    label. So as many noisy samples score above c as below it, and the lowest 2 P(s < c) of the
    scores are the noise's share. c is the mean of the mixture's lower component, capped at 0 (a
    noisy sample has no reason to pull toward the reference): with one bump of clean scores the
    cap holds, nothing lies below 0 and everything is kept.

    Where the lower component itself sits clearly above 0 (its mean more than
    ``CLEAN_SHOULDER_SDS`` of its standard deviations), there is no noise centre at all: the
    component is the lower shoulder of one bump of clean scores, whose tail may still cross 0 (a
    proxy trained for several epochs draws clean scores toward 0), and everything is kept.
    """
    if mixture is not None and mixture.means[0] > CLEAN_SHOULDER_SDS * math.sqrt(mixture.variances[0]):
        lowest = connection.execute("SELECT min(mimic_score) FROM epoch_scores WHERE epoch = ?", [epoch]).fetchone()[0]
        # votes are "score > threshold": one float32 step below the lowest score keeps all (scores are
        # stored as float32, and a double just below one rounds back to it when compared as float32)
        return float(np.nextafter(np.float32(lowest), np.float32(-np.inf)))
    centre = 0.0 if mixture is None else min(0.0, mixture.means[0])
    below, count = connection.execute(
        "SELECT count(*) FILTER (WHERE mimic_score < ?), count(*) FROM epoch_scores WHERE epoch = ?", [centre, epoch]
    ).fetchone()
    if not below:
        return centre
    return connection.execute(
        "SELECT quantile_disc(mimic_score, ?) FROM epoch_scores WHERE epoch = ?", [min(1.0, 2 * below / count), epoch]
    ).fetchone()[0]


def _kmeans_threshold(connection, epoch: int, iterations: int = 30) -> float | None:
    """Midpoint of the two 1-D k-means centres of an epoch's scores (Lloyd's, started at the quartiles)."""
    where = f"epoch = {epoch}"
    low, high = connection.execute(
        f"SELECT quantile_cont(mimic_score, 0.25), quantile_cont(mimic_score, 0.75) FROM epoch_scores WHERE {where}"
    ).fetchone()
    if low is None or low == high:
        return low
    for _ in range(iterations):
        cut = (low + high) / 2
        new_low, new_high = connection.execute(
            f"SELECT avg(mimic_score) FILTER (WHERE mimic_score < ?), avg(mimic_score) FILTER (WHERE mimic_score >= ?) "
            f"FROM epoch_scores WHERE {where}",
            [cut, cut],
        ).fetchone()
        if new_low is None or new_high is None or (new_low == low and new_high == high):
            break
        low, high = new_low, new_high
    return (low + high) / 2


@dataclass(frozen=True)
class Mixture:
    """A fitted two-component 1-D Gaussian mixture; component 1 has the larger mean."""

    means: tuple[float, float]
    variances: tuple[float, float]
    weights: tuple[float, float]

    def crossing(self) -> float:
        return _gaussian_crossing(self.means, self.variances, self.weights)

    def dip(self, points: int = 2001) -> float:
        """The density's lowest point between its two modes over the lower mode (1.0: only one mode).

        Both modes of a two-Gaussian mixture lie between its means, so a grid there finds them.
        """
        (m0, m1), (v0, v1), (w0, w1) = self.means, self.variances, self.weights
        grid = np.linspace(m0, m1, points)
        density = (w0 * np.exp(-((grid - m0) ** 2) / (2 * v0)) / math.sqrt(v0)
                   + w1 * np.exp(-((grid - m1) ** 2) / (2 * v1)) / math.sqrt(v1))
        inner = density[1:-1]
        peaks = np.flatnonzero((inner > density[:-2]) & (inner >= density[2:])) + 1
        for end, neighbour in ((0, 1), (points - 1, points - 2)):  # a mode at a mean itself
            if density[end] > density[neighbour]:
                peaks = np.append(peaks, end)
        if len(peaks) < 2:
            return 1.0
        first, last = int(peaks.min()), int(peaks.max())
        return float(density[first : last + 1].min() / min(density[first], density[last]))

    def second_mode(self) -> bool:
        """Does the fitted density have two modes with a real valley between them?"""
        return self.dip() < SECOND_MODE_DIP

    def as_dict(self) -> dict:
        return {"means": list(self.means), "variances": list(self.variances), "weights": list(self.weights),
                "second_mode": self.second_mode()}

    @classmethod
    def from_dict(cls, values: dict) -> "Mixture":
        return cls(tuple(values["means"]), tuple(values["variances"]), tuple(values["weights"]))


def _gmm_fit(connection, epoch: int, iterations: int = 60) -> Mixture | None:
    """A two-component 1-D Gaussian mixture of an epoch's scores (None when they do not vary).

    EM with sufficient statistics computed in SQL (sums of r, r·x, r·x² per component).
    """
    where = f"epoch = {epoch}"
    stats = connection.execute(
        f"SELECT count(*), quantile_cont(mimic_score, 0.25), quantile_cont(mimic_score, 0.75), "
        f"var_pop(mimic_score) FROM epoch_scores WHERE {where}"
    ).fetchone()
    count, low, high, variance = stats
    if not count or low is None or not variance:
        return None
    means = [low, high]
    variances = [variance / 2, variance / 2]
    weights = [0.5, 0.5]
    for _ in range(iterations):
        # responsibilities of the upper component, in SQL: r = w1 N1 / (w0 N0 + w1 N1)
        log_terms = [
            f"(ln({weights[k]}) - 0.5 * ln(2 * pi() * {variances[k]}) - (mimic_score - {means[k]})^2 / (2 * {variances[k]}))"
            for k in (0, 1)
        ]
        upper = f"1 / (1 + exp(least({log_terms[0]} - {log_terms[1]}, 700)))"
        sums = connection.execute(
            f"SELECT sum({upper}), sum({upper} * mimic_score), sum({upper} * mimic_score^2), "
            f"sum(mimic_score), sum(mimic_score^2) FROM epoch_scores WHERE {where}"
        ).fetchone()
        r1, r1x, r1xx, total_x, total_xx = sums
        r0, r0x, r0xx = count - r1, total_x - r1x, total_xx - r1xx
        if r0 < 1e-9 or r1 < 1e-9:
            break
        new_means = [r0x / r0, r1x / r1]
        floor = variance * 1e-6
        new_variances = [max(r0xx / r0 - new_means[0] ** 2, floor), max(r1xx / r1 - new_means[1] ** 2, floor)]
        new_weights = [r0 / count, r1 / count]
        # converged when the means move by less than a millionth of the scores' spread
        converged = max(abs(a - b) for a, b in zip(new_means, means)) < 1e-6 * math.sqrt(variance)
        means, variances, weights = new_means, new_variances, new_weights
        if converged:
            break
    if means[0] > means[1]:  # keep "upper" meaning the component with the larger mean
        means, variances, weights = means[::-1], variances[::-1], weights[::-1]
    return Mixture(tuple(means), tuple(variances), tuple(weights))


def _gmm_threshold(connection, epoch: int, mixture: Mixture | None) -> float | None:
    """Where a 2-component 1-D Gaussian mixture's upper component becomes the more probable one."""
    if mixture is None:
        return connection.execute(
            f"SELECT quantile_cont(mimic_score, 0.25) FROM epoch_scores WHERE epoch = {epoch}").fetchone()[0]
    return mixture.crossing()


def _gaussian_crossing(means, variances, weights) -> float:
    """The point between the two means where both weighted densities are equal."""
    (m0, m1), (v0, v1), (w0, w1) = means, variances, weights
    # a x^2 + b x + c = 0 from equating the log densities
    a = 1 / (2 * v1) - 1 / (2 * v0)
    b = m0 / v0 - m1 / v1
    c = m1**2 / (2 * v1) - m0**2 / (2 * v0) + math.log((w0 * math.sqrt(v1)) / (w1 * math.sqrt(v0)))
    if abs(a) < 1e-15:
        return -c / b if b else (m0 + m1) / 2
    discriminant = b * b - 4 * a * c
    if discriminant < 0:
        return (m0 + m1) / 2
    roots = [(-b + sign * math.sqrt(discriminant)) / (2 * a) for sign in (1, -1)]
    between = [root for root in roots if min(m0, m1) <= root <= max(m0, m1)]
    return between[0] if between else min(roots, key=lambda root: abs(root - (m0 + m1) / 2))


@dataclass(frozen=True)
class VoteRule:
    """The per-epoch binarisation actually applied: ``column > threshold[epoch]``."""

    column: str
    thresholds: dict[int, float]
    mixtures: dict[int, Mixture | None] | None = None  # the per-epoch fits, where the rule made them

    def sql(self) -> str:
        if len(set(self.thresholds.values())) <= 1:
            threshold = next(iter(self.thresholds.values()), 0.0)
            return f"({self.column} > {threshold!r})"
        cases = " ".join(f"WHEN {epoch} THEN {threshold!r}" for epoch, threshold in sorted(self.thresholds.items()))
        return f"({self.column} > CASE epoch {cases} END)"


def _epochs(connection) -> list[int]:
    epochs = [row[0] for row in connection.execute("SELECT DISTINCT epoch FROM scores ORDER BY epoch").fetchall()]
    if len(epochs) > MAX_EPOCHS_FOR_PATTERNS:
        raise MimicfilterError(f"{len(epochs)} epochs: vote aggregation supports at most {MAX_EPOCHS_FOR_PATTERNS}")
    return epochs


def _epoch_scores(connection) -> None:
    # The fits scan one epoch's scores dozens of times: keep just that column, once, in DuckDB
    # (4 bytes a row, spilled by DuckDB if need be) instead of re-reading the Parquet parts.
    connection.execute(
        "CREATE OR REPLACE TEMP TABLE epoch_scores AS SELECT epoch, mimic_score::DOUBLE AS mimic_score "
        "FROM scores WHERE status = 'ok' AND mimic_score IS NOT NULL"
    )


def epoch_mixtures(connection) -> dict[int, Mixture | None]:
    """Each epoch's two-component mixture of its scores (None where the scores do not vary)."""
    epochs = _epochs(connection)
    _epoch_scores(connection)
    return {epoch: _gmm_fit(connection, epoch) for epoch in epochs}


def vote_rule(connection, binarize: str, mixtures: dict[int, Mixture | None] | None = None) -> VoteRule:
    """The per-epoch thresholds of a binarisation; ``mixtures`` reuses fits already made."""
    epochs = _epochs(connection)
    if binarize == "threshold":
        return VoteRule("mimic_weight", {epoch: 1.0 for epoch in epochs})
    if binarize == "sign":
        return VoteRule("mimic_score", {epoch: 0.0 for epoch in epochs})
    _epoch_scores(connection)
    if binarize == "kmeans":
        fitted = {epoch: _kmeans_threshold(connection, epoch) for epoch in epochs}
        return VoteRule("mimic_score", {epoch: 0.0 if value is None else float(value) for epoch, value in fitted.items()})
    if mixtures is None:
        mixtures = {epoch: _gmm_fit(connection, epoch) for epoch in epochs}
    fit = _mirror_threshold if binarize == "mirror" else _gmm_threshold
    thresholds = {}
    for epoch in epochs:
        threshold = fit(connection, epoch, mixtures.get(epoch))
        thresholds[epoch] = 0.0 if threshold is None else float(threshold)
    return VoteRule("mimic_score", thresholds, mixtures)


def dawid_skene(patterns: np.ndarray, counts: np.ndarray, epochs: int, iterations: int = 100) -> np.ndarray:
    """P(keep | vote pattern) under a binary Dawid–Skene model with one annotator per epoch.

    ``patterns`` are bitmasks (bit e = epoch e voted keep), ``counts`` how many samples share each.
    Started from the majority vote, so the latent class "keep" is the one the votes mostly say.
    """
    votes = ((patterns[:, None] >> np.arange(epochs)[None, :]) & 1).astype(float)  # [P, E]
    posterior = (votes.mean(axis=1) > 0.5).astype(float) * 0.8 + 0.1
    clip = 1e-4
    for _ in range(iterations):
        weight_keep, weight_drop = counts * posterior, counts * (1 - posterior)
        prior = np.clip(weight_keep.sum() / counts.sum(), clip, 1 - clip)
        sensitivity = np.clip((weight_keep @ votes) / max(weight_keep.sum(), clip), clip, 1 - clip)
        specificity = np.clip((weight_drop @ (1 - votes)) / max(weight_drop.sum(), clip), clip, 1 - clip)
        log_odds = (
            math.log(prior / (1 - prior))
            + votes @ np.log(sensitivity / (1 - specificity))
            + (1 - votes) @ np.log((1 - sensitivity) / specificity)
        )
        updated = 1 / (1 + np.exp(-np.clip(log_odds, -50, 50)))
        if np.max(np.abs(updated - posterior)) < 1e-10:
            posterior = updated
            break
        posterior = updated
    return posterior


def aggregate(connection, config: AggregateConfig) -> dict:
    """Create table ``samples`` (one row per (shard, key)); returns how votes were made."""
    rule = vote_rule(connection, config.binarize)
    votes = [
        "sum(CASE WHEN vote THEN 1 ELSE 0 END)::INTEGER AS votes",
        "sum(CASE WHEN vote THEN (1::BIGINT << epoch::BIGINT) ELSE 0 END)::BIGINT AS vote_pattern",
    ]
    rows = f"(SELECT *, coalesce({rule.sql()}, false) AS vote FROM scores)"
    votes += epoch_columns(sorted(rule.thresholds))  # per-epoch mimic scores: rules and calibration read them
    connection.execute(f"CREATE OR REPLACE TABLE samples AS {per_sample_sql(connection, 'scores', votes, rows)}")
    epochs = len(rule.thresholds)
    if config.combine_votes == "majority":
        connection.execute("ALTER TABLE samples ADD COLUMN vote_keep BOOLEAN")
        connection.execute("UPDATE samples SET vote_keep = (votes * 2 > epochs)")
        label_model = None
    else:
        rows = connection.execute(
            "SELECT vote_pattern, count(*) FROM samples WHERE status = 'ok' GROUP BY vote_pattern"
        ).fetchall()
        patterns = np.array([row[0] for row in rows], dtype=np.int64)
        counts = np.array([row[1] for row in rows], dtype=float)
        posterior = dawid_skene(patterns, counts, epochs) if len(rows) else np.array([])
        connection.execute("CREATE OR REPLACE TEMP TABLE pattern_posterior (vote_pattern BIGINT, keep_probability DOUBLE)")
        if len(rows):
            connection.executemany("INSERT INTO pattern_posterior VALUES (?, ?)", list(zip(patterns.tolist(), posterior.tolist())))
        connection.execute(
            """CREATE OR REPLACE TABLE samples AS
               SELECT s.*, coalesce(p.keep_probability > 0.5, false) AS vote_keep
               FROM samples s LEFT JOIN pattern_posterior p USING (vote_pattern)"""
        )
        label_model = {"patterns": len(rows)}
    return {
        "binarize": config.binarize,
        "vote_column": rule.column,
        "thresholds": {str(epoch): threshold for epoch, threshold in sorted(rule.thresholds.items())},
        "combine_votes": config.combine_votes,
        "epochs": epochs,
        **({"label_model": label_model} if label_model else {}),
        **({"mixtures": {str(epoch): mixture.as_dict() if mixture else None for epoch, mixture in rule.mixtures.items()}}
           if rule.mixtures is not None else {}),
    }

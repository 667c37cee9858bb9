"""Calibrated curation: the pool's clean share with an interval, and the precision and recall of every
cut, measured against the anchors a run scored beside its pool (``score --trusted``, pipeline/anchors.py).

    anchor_scores ──► per anchor: its signals ──► each signal's separation (AUROC trusted vs synthetic)
    scores (hash sample of the pool) ──► the chosen signal ──► clean share (curate/mixture.py), interval,
                                                               precision / recall per threshold ──► the cut

Signals (per sample, over its epochs): the mimic score (mean and per epoch), the reference's CLIP
score, its negCLIP score (the CLIP score less the batch's contrastive normaliser) and its own loss
(lower is cleaner). The one that separates the trusted samples from the synthetic negatives best
is used. Torch-free; everything reads DuckDB views made by curate/duck.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mimicfilter.curate.duck import epoch_columns, hash_condition, per_sample_sql
from mimicfilter.curate.mixture import (CLEAN_TEST_LEVEL, clean_share, kept_near, recall_error, same_distribution_p,
                                        tail_curve, threshold_for_precision, threshold_for_recall)
from mimicfilter.curate.rules import Rule
from mimicfilter.defaults import CALIBRATED_TARGET_RECALL as DEFAULT_TARGET_RECALL, MIN_ANCHORS
from mimicfilter.errors import MimicfilterError
from mimicfilter.metrics import auroc
from mimicfilter.store.schema import CONFUSABLE, SYNTHETIC, TRUSTED

POOL_SAMPLE = 200_000  # pool samples the estimate and the curve are computed on (hash-sampled beyond)
WEAK_SEPARATION = 0.85  # below this AUROC (trusted vs synthetic) the estimate's worst case is wider
BOOTSTRAP_ROUNDS = 200


@dataclass(frozen=True)
class Signal:
    column: str  # a column of the per-sample table
    higher_is_clean: bool = True

    @property
    def name(self) -> str:
        return self.column

    def oriented(self, values: np.ndarray) -> np.ndarray:
        return values if self.higher_is_clean else -values


def candidate_signals(columns: set[str], epochs: list[int]) -> list[Signal]:
    """The signals a run's per-sample table can give (per-epoch mimic scores only with more than one epoch)."""
    signals = [Signal("mimic_score")]
    if len(epochs) > 1:
        signals += [Signal(f"mimic_score_e{epoch}") for epoch in epochs]
    signals += [Signal(name) for name in ("clip_score", "negclip_score") if name in columns]
    if "ref_loss" in columns:
        signals.append(Signal("ref_loss", higher_is_clean=False))
    return signals


def signal_values(connection, source: str, signals: list[Signal], epochs: list[int], where: str = "true",
                  extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Per usable sample of ``source`` (``scores`` or ``anchor_scores``): every signal's value (NaN where
    missing), plus the ``extra`` aggregates (``"any_value(anchor) AS anchor"``)."""
    rows = f"(SELECT * FROM {source} WHERE {where})"
    sql = per_sample_sql(connection, source, list(extra) + epoch_columns(epochs), rows)
    selected = ", ".join([f"{signal.column}::DOUBLE AS {signal.column}" for signal in signals]
                         + [name.rsplit(" AS ", 1)[-1] for name in extra])
    # in a fixed order: the bootstrap resamples by position, so the interval must not follow DuckDB's threads
    data = connection.execute(f"SELECT {selected} FROM ({sql}) WHERE status = 'ok' "
                              'ORDER BY shard, "index"').fetchnumpy()
    floats = {signal.column for signal in signals}
    return {name: np.ma.filled(np.ma.asarray(values).astype(float), np.nan) if name in floats else np.asarray(values)
            for name, values in data.items()}


@dataclass(frozen=True)
class Calibration:
    """The calibrated estimate of a pool and what the cut would keep."""

    value: float  # estimated clean share of the pool's usable samples
    low: float
    high: float
    trusted: int  # usable anchors the estimate stands on
    synthetic: int  # synthetic negatives of both kinds
    signal: str  # the per-sample column it was computed on
    higher_is_clean: bool
    separation: dict[str, float]  # AUROC of each signal, trusted vs synthetic
    upper: float  # the best-bin estimate (an upper bound up to sampling error)
    explained: float | None  # the two-component estimate (trusted + negatives; its bootstrap median)
    method: str  # which of the two is the value: "two-component", or "best-bin" when the noise is unlike the synthetic
    clean_p: float  # two-sample KS p-value of the pool against the trusted sample (≥ 0.001: a clean pool is possible)
    confusable: int = 0  # of the synthetic negatives: the confusable ones (labelled pools)
    curve: list[dict[str, float]] = field(default_factory=list)  # threshold, kept, recall, precision

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Anchored:
    """The arrays a calibration is computed from (oriented: higher = cleaner)."""

    pool: np.ndarray
    trusted: np.ndarray
    synthetic: np.ndarray
    signal: Signal
    separation: dict[str, float]
    # every separated signal's usable (signal, pool, trusted) values, oriented: the recall cut's candidates
    others: dict[str, tuple[Signal, np.ndarray, np.ndarray]] = field(default_factory=dict)
    confusable: np.ndarray = field(default_factory=lambda: np.zeros(0))  # labelled pools' confusable negatives


def anchor_statuses(connection) -> dict[str, dict[str, int]]:
    """Per anchor kind (trusted, synthetic, confusable): how many anchors have each status ("ok": usable)."""
    sql = per_sample_sql(connection, "anchor_scores", ["any_value(anchor) AS anchor"])
    statuses: dict[str, dict[str, int]] = {}
    for kind, status, count in connection.execute(
            f"SELECT anchor, status, count(*) FROM ({sql}) GROUP BY ALL ORDER BY ALL").fetchall():
        statuses.setdefault(kind, {})[status] = count
    return statuses


def gather(connection, epochs: list[int]) -> Anchored | None:
    """The anchors' and a hash sample of the pool's signals; None without enough usable anchors."""
    if anchor_statuses(connection).get(TRUSTED, {}).get("ok", 0) < MIN_ANCHORS:
        return None
    columns = {row[0] for row in connection.execute("DESCRIBE samples").fetchall()}
    signals = [signal for signal in candidate_signals(columns, epochs) if signal.column in columns]
    anchors = signal_values(connection, "anchor_scores", signals, epochs, extra=("any_value(anchor) AS anchor",))
    is_trusted, is_synthetic = anchors["anchor"] == TRUSTED, anchors["anchor"] == SYNTHETIC
    pool = pool_values(connection, signals)
    return choose_signal(signals, pool, anchors, is_trusted, is_synthetic, anchors["anchor"] == CONFUSABLE)


def pool_values(connection, signals: list[Signal]) -> dict[str, np.ndarray]:
    """Every signal of a hash sample of the usable pool samples, from the per-sample table ``samples``
    (made once by the votes' aggregation, or a filter manifest's): no further pass over the score rows."""
    total = connection.execute("SELECT count(*) FROM samples WHERE status = 'ok'").fetchone()[0]
    columns = ", ".join(f"{signal.column}::DOUBLE AS {signal.column}" for signal in signals)
    data = connection.execute(
        f"SELECT {columns} FROM samples WHERE status = 'ok' AND {hash_condition(total, POOL_SAMPLE)} "
        'ORDER BY shard, "index"').fetchnumpy()
    return {name: np.ma.filled(np.ma.asarray(values).astype(float), np.nan) for name, values in data.items()}


def choose_signal(signals: list[Signal], pool: dict[str, np.ndarray], anchors: dict[str, np.ndarray],
                  is_trusted: np.ndarray, is_synthetic: np.ndarray, is_confusable: np.ndarray | None = None) -> Anchored | None:
    """Each signal's separation of the trusted from the synthetic anchors (AUROC); the arrays of the best
    one (ties: the first listed); None when no signal has enough of both."""
    separation = {}
    for signal in signals:
        values = signal.oriented(anchors[signal.column])
        usable = ~np.isnan(values) & (is_trusted | is_synthetic)
        if is_trusted[usable].sum() >= MIN_ANCHORS and is_synthetic[usable].sum() >= MIN_ANCHORS:
            separation[signal.name] = round(auroc(values[usable], is_trusted[usable]), 4)
    if not separation:
        return None
    best = max(separation, key=lambda name: (separation[name], -list(separation).index(name)))
    signal = next(s for s in signals if s.name == best)

    def usable(values: np.ndarray, of: Signal = signal) -> np.ndarray:
        oriented = of.oriented(values)
        return oriented[~np.isnan(oriented)]

    others = {s.name: (s, usable(pool[s.column], s), usable(anchors[s.column][is_trusted], s))
              for s in signals if s.name in separation}
    _, pool_side, trusted_side = others[best]
    confusable = usable(anchors[signal.column][is_confusable]) if is_confusable is not None else np.zeros(0)
    return Anchored(pool_side, trusted_side, usable(anchors[signal.column][is_synthetic]), signal, separation,
                    others, confusable if len(confusable) >= MIN_ANCHORS else np.zeros(0))


def cut_signal(data: Anchored, recall: float) -> tuple[Signal, np.ndarray, float]:
    """The signal the recall cut is made on, its pool values and its (oriented) threshold.

    At a fixed recall of the clean samples, the cut that keeps the least of the pool drops the most noise:
    with the clean share π the same on every signal, the dropped set's precision and recall both grow as
    the kept share shrinks. The signal that separates the anchors best (the estimate's) is not always that
    one: class-dependent label noise is nothing like the random flips of the synthetic negatives, and a
    signal with a lower AUROC on them can drop more of it. So the cut moves to the signal keeping the least
    (:func:`kept_near`) when it keeps less by more than one standard error of the trusted sample's recall
    (√(r(1-r)/n), the kept share's sampling error at the threshold) — a smaller gap is the trusted
    sample's luck. Not when the pool is consistent with clean (the KS test): there every signal keeps
    ≈ r, and the least is luck."""
    threshold = threshold_for_recall(data.trusted, recall)
    chosen = (data.signal, data.pool, threshold)
    if not data.others or same_distribution_p(data.pool, data.trusted) >= CLEAN_TEST_LEVEL:
        return chosen
    kept = kept_by_signal(data, recall)
    least = min(kept, key=kept.get)  # ties: the first listed
    if kept[least] >= kept[data.signal.name] - recall_error(recall, len(data.trusted)):
        return chosen
    signal, pool, trusted = data.others[least]
    return signal, pool, threshold_for_recall(trusted, recall)


def kept_by_signal(data: Anchored, recall: float) -> dict[str, float]:
    """Each signal's pool share that the trusted sample's cut at ``recall`` keeps (:func:`kept_near`):
    what :func:`cut_signal` compares, and what summary.json shows of it."""
    kept = {name: kept_near(pool, trusted, recall) for name, (_, pool, trusted) in data.others.items()
            if len(pool) and len(trusted) >= MIN_ANCHORS}
    if data.signal.name not in kept:
        kept[data.signal.name] = kept_near(data.pool, data.trusted, recall)
    return kept


def estimate(data: Anchored, seed: int = 0) -> Calibration:
    """The clean share (see docs/filter.md "Calibrated curation"), its bootstrap interval and the curve."""
    if not len(data.pool):
        raise MimicfilterError("no usable pool sample to calibrate", hint="check the run's statuses")
    share = clean_share(data.pool, data.trusted, data.synthetic, BOOTSTRAP_ROUNDS, seed, data.confusable)
    value = share.value
    curve = tail_curve(data.pool, data.trusted, value)
    sign = 1.0 if data.signal.higher_is_clean else -1.0
    points = [{"threshold": round(sign * float(t), 6), "kept": round(float(k), 6), "recall": round(float(r), 6),
               "precision": round(float(p), 6)}
              for t, k, r, p in zip(curve["threshold"], curve["kept"], curve["recall"], curve["precision"])]
    return Calibration(round(value, 6), round(share.low, 6), round(share.high, 6), len(data.trusted),
                       len(data.synthetic) + len(data.confusable), data.signal.name, data.signal.higher_is_clean,
                       data.separation, round(share.upper, 6),
                       None if np.isnan(share.explained) else round(share.explained, 6), share.method,
                       round(share.clean_p, 6), len(data.confusable), points)


def cut_threshold(data: Anchored, calibration: Calibration, target_precision: float | None,
                  target_recall: float | None) -> tuple[Signal, float] | None:
    """The signal and its threshold (in the signal's own orientation) meeting the target; None when none
    does. A recall target is cut on :func:`cut_signal`'s choice, a precision target on the estimate's signal
    (the precision curve is the estimate's)."""
    if target_recall is not None:
        signal, _, oriented = cut_signal(data, target_recall)
    else:
        signal = data.signal
        oriented = threshold_for_precision(data.pool, data.trusted, calibration.value, target_precision)
        if oriented is None:
            return None
    return signal, (oriented if signal.higher_is_clean else -oriented)


@dataclass(frozen=True)
class CalibratedCut:
    """The calibration of a filter run and, when a calibrated cut keeps samples, that cut."""

    calibration: Calibration
    rule: Rule | None  # the calibrated keep rule (None when no threshold reaches the target)
    target: dict[str, float]  # {"recall": r} or {"precision": p}
    expected: dict[str, Any] | None  # the cut's estimated kept share, precision and recall (and kept_by_signal)

    def summary(self) -> dict:
        return {**self.calibration.as_dict(), "cut": {"target": self.target, "rule": self.rule.text if self.rule else None,
                                                      "signal": self.rule.column if self.rule else None,
                                                      **(self.expected or {})}}


def _expected(data: Anchored, calibration: Calibration, signal: Signal, threshold: float) -> dict[str, float]:
    _, pool, trusted = data.others.get(signal.name, (signal, data.pool, data.trusted))
    oriented = threshold if signal.higher_is_clean else -threshold
    kept = float(np.mean(pool >= oriented))
    recall = float(np.mean(trusted >= oriented))
    return {"threshold": threshold, "kept": round(kept, 6), "recall": round(recall, 6),
            "precision": round(min(1.0, calibration.value * recall / kept), 6) if kept else None}  # none kept: none


def calibrated_cut(connection, epochs: list[int], target_precision: float | None = None,
                   target_recall: float | None = None, seed: int = 0) -> CalibratedCut | None:
    """Calibrate the pool against its anchors and make the cut for the target (recall by default);
    None when the run has too few anchors. Reads ``scores``: call before file access is switched off."""
    data = gather(connection, epochs)
    if data is None:
        return None
    calibration = estimate(data, seed)
    target = {"precision": target_precision} if target_precision is not None else {
        "recall": target_recall if target_recall is not None else DEFAULT_TARGET_RECALL}
    cut = cut_threshold(data, calibration, target_precision, target.get("recall"))
    if cut is None:
        return CalibratedCut(calibration, None, target, None)
    signal, threshold = cut
    rule = Rule("calibrated", column=signal.column, value=threshold,
                expression=">=" if signal.higher_is_clean else "<=")
    expected = _expected(data, calibration, signal, threshold)
    if "recall" in target:
        expected["kept_by_signal"] = {name: round(kept, 6) for name, kept in kept_by_signal(data, target["recall"]).items()}
    return CalibratedCut(calibration, rule, target, expected)


def calibration_warnings(connection, cut: CalibratedCut | None) -> list[str]:
    """What `filter` and `report` warn of: too few usable anchors to calibrate (how many, and what the
    others lack), a weak signal, an estimate read from the top of the signal."""
    if cut is None:
        statuses = anchor_statuses(connection)
        if not statuses:
            return []
        usable = {kind: statuses.get(kind, {}).get("ok", 0) for kind in (TRUSTED, SYNTHETIC)}
        short = next((kind for kind, count in usable.items() if count < MIN_ANCHORS), TRUSTED)
        of_kind = statuses.get(short, {})
        unusable = ", ".join(f"{status} {count}" for status, count in of_kind.items() if status != "ok")
        return [f"only {usable[short]} of {sum(of_kind.values())} {short} anchors are usable"
                f"{f' ({unusable})' if unusable else ''}: at least {MIN_ANCHORS} usable ones calibrate the estimate; "
                "the relative score is uncalibrated"]
    warnings = []
    separation = cut.calibration.separation[cut.calibration.signal]
    if separation < WEAK_SEPARATION:
        warnings.append(f"the anchors' best signal ({cut.calibration.signal}) separates trusted from synthetic samples "
                        f"with AUROC {separation:.2f} only: read the quality estimate with its interval")
    if cut.calibration.method.startswith("best-bin"):
        warnings.append("the pool's noise scores closer to the trusted samples than the synthetic negatives do: the "
                        "quality estimate is best-bin's, read from the top of the signal; its interval reaches up to "
                        "best-bin's confidence bound")
    return warnings

"""Detector evaluation: precision and recall per detector on synthetic series with labelled incidents.

Each trial draws a fresh noisy series (a falling loss curve, per-step data waits, tokens/s, per-rank
parameter fingerprints), injects incidents at random steps with random sizes, runs the detector with
its default config, and matches events to labels (an event within `tolerance` steps after a label is a
true positive; anything else a false positive). Goal: >= 0.95 for both, for every detector.

    python bench/detectors.py [--trials 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import random

from watchtower.hooks.detectors import (DataStallConfig, DataStallDetector, LossSpikeConfig, LossSpikeDetector,
                                        ThroughputConfig, ThroughputDropDetector, compare_replicated, compare_shards)


class Score:
    def __init__(self) -> None:
        self.tp = self.fp = self.fn = 0

    def match(self, labels: list[int], fired: list[int], tolerance: int) -> None:
        unmatched = list(fired)
        for label in labels:
            hit = next((f for f in unmatched if label <= f <= label + tolerance), None)
            if hit is None:
                self.fn += 1
            else:
                self.tp += 1
                unmatched.remove(hit)
        self.fp += len(unmatched)

    def row(self) -> dict:
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0
        return {"precision": round(precision, 4), "recall": round(recall, 4), "events": self.tp + self.fp,
                "labels": self.tp + self.fn}


def loss_curve(rng: random.Random, n: int) -> list[float]:
    floor, scale, tau, noise = rng.uniform(1.8, 3.0), rng.uniform(2, 5), rng.uniform(30, 300), rng.uniform(0.005, 0.03)
    return [(floor + scale * math.exp(-s / tau)) * (1 + rng.gauss(0, noise)) for s in range(n)]


def spaced_steps(rng: random.Random, lo: int, hi: int, count: int, gap: int) -> list[int]:
    steps: list[int] = []
    while len(steps) < count:
        s = rng.randrange(lo, hi)
        if all(abs(s - t) > gap for t in steps):
            steps.append(s)
    return sorted(steps)


def eval_loss_spike(rng, trials) -> Score:
    score = Score()
    for _ in range(trials):
        curve = loss_curve(rng, 1500)
        labels = spaced_steps(rng, 150, 1500, rng.randint(0, 4), 60)
        for s in labels:
            curve[s] *= rng.uniform(1.5, 6.0)
        d = LossSpikeDetector(LossSpikeConfig())
        score.match(labels, [e.step for i, v in enumerate(curve) for e in d.update(i, v)], 0)
    return score


def eval_nonfinite(rng, trials) -> Score:
    """The monitor's rule: any non-finite loss or grad norm is an event at its step."""
    score = Score()
    for _ in range(trials):
        curve = loss_curve(rng, 500)
        labels = spaced_steps(rng, 0, 500, rng.randint(0, 3), 5)
        for s in labels:
            curve[s] = rng.choice([float("nan"), float("inf"), -float("inf")])
        score.match(labels, [i for i, v in enumerate(curve) if not math.isfinite(v)], 0)
    return score


def eval_data_stall(rng, trials) -> Score:
    score = Score()
    for _ in range(trials):
        base, step_time = rng.uniform(0.001, 0.05), rng.uniform(0.1, 1.0)
        waits = [base * rng.lognormvariate(0, 0.3) for _ in range(800)]
        labels = spaced_steps(rng, 60, 800, rng.randint(0, 4), 20)
        for s in labels:
            waits[s] = rng.uniform(2.0, 60.0)
        d = DataStallDetector(DataStallConfig(trend_window=10_000))  # the trend half is scored below
        score.match(labels, [e.step for i, w in enumerate(waits) for e in d.update(i, w, step_time + w)
                             if e.detector == "data_stall"], 0)
    return score


def eval_data_wait_rising(rng, trials) -> Score:
    score = Score()
    cfg = DataStallConfig()
    for _ in range(trials):
        base, step_time = rng.uniform(0.001, 0.02), rng.uniform(0.1, 0.5)
        creeping = rng.random() < 0.5
        onset, growth = rng.randrange(200, 600), rng.uniform(0.002, 0.02) * step_time
        waits = [base * rng.lognormvariate(0, 0.3) + (growth * (i - onset) if creeping and i > onset else 0)
                 for i in range(1200)]
        d = DataStallDetector(cfg)
        fired = [e.step for i, w in enumerate(waits) for e in d.update(i, w, step_time + w)
                 if e.detector == "data_wait_rising"]
        score.match([onset] if creeping else [], fired, 600)
    return score


def eval_throughput(rng, trials) -> Score:
    score = Score()
    cfg = ThroughputConfig()
    for _ in range(trials):
        base, noise = rng.uniform(1e3, 1e6), rng.uniform(0.01, 0.05)
        series = [base * (1 + rng.gauss(0, noise)) for _ in range(1000)]
        for s in spaced_steps(rng, 130, 1000, rng.randint(0, 3), 10):  # blips: checkpoint saves
            series[s] *= 0.1
        labels = []
        if rng.random() < 0.5:
            onset = rng.randrange(300, 800)
            labels = [onset]
            factor = rng.uniform(0.2, 0.6)
            for s in range(onset, 1000):
                series[s] *= factor
        d = ThroughputDropDetector(cfg)
        score.match(labels, [e.step for i, v in enumerate(series) for e in d.update(i, v)], cfg.patience + 5)
    return score


def eval_tp_shards(rng, trials) -> tuple[Score, Score]:
    """Seed bug (identical shards) and replicated divergence, on random fingerprints of 2-8 ranks."""
    shards, replicated = Score(), Score()
    for t in range(trials):
        ranks, names = rng.choice([2, 4, 8]), [f"p{i}" for i in range(rng.randint(5, 40))]
        prints = [[[rng.gauss(0, 1) for _ in range(3)] for _ in names] for _ in range(ranks)]
        bugged = rng.random() < 0.5
        if bugged:
            for r in range(1, ranks):
                prints[r] = [list(p) for p in prints[0]]
        shards.match([t] if bugged else [], [t] if compare_shards(prints, names) else [], 0)
        same = [[list(p) for p in prints[0]] for _ in range(ranks)]
        drift = rng.random() < 0.5
        if drift:
            victim = rng.randrange(1, ranks)
            same[victim][rng.randrange(len(names))][rng.randrange(3)] *= 1 + rng.choice([1e-4, 1e-3, 0.1])
        replicated.match([t] if drift else [], [t] if compare_replicated(same, names) else [], 0)
    return shards, replicated


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    shards, replicated = eval_tp_shards(rng, args.trials)
    rows = {"loss_spike": eval_loss_spike(rng, args.trials).row(), "nonfinite": eval_nonfinite(rng, args.trials).row(),
            "data_stall": eval_data_stall(rng, args.trials).row(),
            "data_wait_rising": eval_data_wait_rising(rng, args.trials).row(),
            "throughput_drop": eval_throughput(rng, args.trials).row(),
            "tp_identical_shards": shards.row(), "tp_replicated_divergence": replicated.row()}
    print(f"{'detector':28}{'precision':>10}{'recall':>10}{'events':>8}{'labels':>8}")
    for name, r in rows.items():
        print(f"{name:28}{r['precision']:10.3f}{r['recall']:10.3f}{r['events']:8d}{r['labels']:8d}")
    print(json.dumps({f"{name}_{k}": r[k] for name, r in rows.items() for k in ("precision", "recall")}))


if __name__ == "__main__":
    main()

"""Scoring of the paper's benchmarks (`todre.evaluate.score_benchmark`), checked against the definitions:
MME = per category, the mean over images of accuracy + accuracy+ (%), summed over the perception categories."""
import random

import pytest

from todre.evaluate import MME_PERCEPTION, benchmark_row, score_benchmark


def mme_rows(n_images, categories, rng):
    rows = []
    for i in range(n_images):
        cat = rng.choice(categories)
        for a in ("Yes", "No"):
            rows.append(benchmark_row("mme", dict(image=None, question=f"Q{i}{a}? Please answer yes or no.", answer=a,
                                                  question_id=f"{i}.png", category=cat)))
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_mme_score_matches_definition(seed):
    rng = random.Random(seed)
    rows = mme_rows(40, ["existence", "count", "OCR", "code_reasoning"], rng)
    preds = [r["answer"] if rng.random() < 0.7 else ("no" if r["answer"] == "Yes" else "yes") for r in rows]
    s = score_benchmark("mme", rows, preds)
    per_cat = {}
    for j in range(0, len(rows), 2):
        right = [preds[j + t].lower() == rows[j + t]["answer"].lower() for t in (0, 1)]
        per_cat.setdefault(rows[j]["category"], []).append(50 * sum(right) + 100 * all(right))
    expected = {c: sum(v) / len(v) for c, v in per_cat.items()}
    assert s["categories"] == pytest.approx(expected)
    assert s["perception"] == pytest.approx(sum(v for c, v in expected.items() if c in MME_PERCEPTION))
    assert s["score"] == s["perception"]


def test_mme_perfect_is_200_per_category():
    rows = mme_rows(10, ["color"], random.Random(0))
    assert score_benchmark("mme", rows, [r["answer"] for r in rows])["perception"] == 200.0


def test_scienceqa_letters():
    row = benchmark_row("scienceqa", dict(image=None, question="Pick one.", choices=["x", "y", "z"], answer=2, hint=""))
    assert row["question"].startswith("Pick one.\nA. x\nB. y\nC. z\n") and row["answer"] == "C"
    assert score_benchmark("scienceqa", [row] * 5, ["C", "C.", "C) z", "c", "The answer is C"])["score"] == 60.0

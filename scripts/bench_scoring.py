"""Speed of VLMEvalKit-exact scoring on frames the size of the four full benchmarks.

    python scripts/bench_scoring.py [--repeats 5] [--seed 0]

Builds synthetic prediction frames in memory (DocVQA_VAL 5 349, ChartQA_TEST 2 500,
MMBench_DEV_EN 4 329 and MME 2 374 rows = 14 552) with realistic prediction strings
(short answers, chain-of-thought paragraphs, verbose multiple-choice explanations), then
prints the median wall time of scoring all four, and separately the median time to read
the same frames back from VLMEvalKit-style xlsx files. Target: scoring < 2 s on 2 cores.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import lavender_checks  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd

from lavender_checks.benchmarks import get_benchmark
from lavender_checks.vlmeval_io import read_prediction_file, roundtrip, write_prediction_file

WORDS = ("the total revenue for year page section chart value shown figure table company report "
         "percent number of people in data per cent growth rate sales market share date name "
         "address invoice amount dollars million").split()
MMB_CATEGORIES = {
    "coarse_perception": ["image_style", "image_scene", "image_emotion", "image_quality", "image_topic"],
    "finegrained_perception (instance-level)": ["object_localization", "attribute_recognition",
                                                "celebrity_recognition", "ocr"],
    "finegrained_perception (cross-instance)": ["spatial_relationship", "attribute_comparison",
                                                "action_recognition"],
    "attribute_reasoning": ["physical_property_reasoning", "function_reasoning", "identity_reasoning"],
    "relation_reasoning": ["social_relation", "physical_relation", "nature_relation"],
    "logic_reasoning": ["structuralized_imagetext_understanding", "future_prediction"],
}
# MME images per subtask (official sizes): 1 187 images, 2 questions each.
MME_IMAGES = {"existence": 30, "count": 30, "position": 30, "color": 30, "posters": 147,
              "celebrity": 170, "scene": 200, "landmark": 200, "artwork": 200, "OCR": 20,
              "commonsense_reasoning": 70, "numerical_calculation": 20, "text_translation": 20,
              "code_reasoning": 20}


def _phrase(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))


def docvqa_frame(rng: random.Random, rows: int = 5349) -> pd.DataFrame:
    answers, predictions = [], []
    for _ in range(rows):
        truth = [_phrase(rng, 1, 4) for _ in range(rng.randint(1, 3))]
        answers.append(repr(truth))
        kind = rng.random()
        if kind < 0.6:
            predictions.append(truth[0])
        elif kind < 0.8:
            predictions.append(truth[0][:-2] + "xy")
        elif kind < 0.9:
            predictions.append(f"The answer is {truth[0]}.")
        else:
            predictions.append(_phrase(rng, 5, 40))
    return pd.DataFrame({"index": range(rows), "question": [_phrase(rng, 6, 14) + "?" for _ in range(rows)],
                         "answer": answers, "prediction": predictions})


def chartqa_frame(rng: random.Random, rows: int = 2500) -> pd.DataFrame:
    answers, predictions = [], []
    for _ in range(rows):
        truth = str(rng.choice([rng.randint(0, 2020), round(rng.uniform(0, 100), 1), "Yes", "No",
                                rng.choice(WORDS)]))
        answers.append(truth)
        if rng.random() < 0.15:
            predictions.append(truth)
        else:  # the 11B chain-of-thought prompt: long reasoning, whole string scored
            steps = " ".join(f"Step {i}: {_phrase(rng, 10, 30)}." for i in range(1, rng.randint(3, 8)))
            predictions.append(f"{steps}\n\nFINAL ANSWER: {truth}")
    return pd.DataFrame({"index": range(rows), "question": [_phrase(rng, 6, 14) + "?" for _ in range(rows)],
                         "answer": answers, "split": ["test_human"] * (rows // 2) + ["test_augmented"] * (rows - rows // 2),
                         "prediction": predictions})


def mmbench_frame(rng: random.Random, groups_of_four: int = 837, groups_of_three: int = 327) -> pd.DataFrame:
    rows = []
    taxonomy = [(l2, c) for l2, cats in MMB_CATEGORIES.items() for c in cats]
    sizes = [4] * groups_of_four + [3] * groups_of_three
    for main, size in enumerate(sizes, start=1):
        l2, category = taxonomy[main % len(taxonomy)]
        options = [_phrase(rng, 1, 4) for _ in range(size)]
        right = rng.randrange(size)
        hint = _phrase(rng, 5, 15) if rng.random() < 0.4 else float("nan")
        for k in range(size):
            rotated = options[k:] + options[:k]
            letter = "ABCD"[rotated.index(options[right])]
            kind = rng.random()
            if kind < 0.3:
                prediction = f"{letter}. {rotated['ABCD'.index(letter)]}"
            elif kind < 0.6:
                prediction = f"The correct answer is {letter}. {_phrase(rng, 20, 60)}"
            elif kind < 0.8:
                prediction = f"{letter}"
            else:
                prediction = _phrase(rng, 30, 90)
            row = {"index": main + k * 1_000_000, "question": _phrase(rng, 6, 14) + "?", "hint": hint}
            for position, text in enumerate("ABCD"):
                row[text] = rotated[position] if position < size else float("nan")
            row.update({"answer": letter, "category": category, "l2-category": l2, "split": "dev",
                        "prediction": prediction})
            rows.append(row)
    return pd.DataFrame(rows)


def mme_frame(rng: random.Random) -> pd.DataFrame:
    rows = []
    replies = ["Yes", "No", "Yes.", "No.", "Yes, there is a {} in the image.", "No, the image does not show {}.",
               "The answer is no.", "**Yes**", "I cannot tell whether {} is visible."]
    for category, images in MME_IMAGES.items():
        for image in range(images):
            for answer in ("Yes", "No"):
                reply = rng.choice(replies).format(_phrase(rng, 1, 3))
                rows.append({"index": len(rows), "question": f"Is there a {_phrase(rng, 1, 3)}? Please answer yes or no.",
                             "answer": answer, "category": category, "image_path": f"{category}/{image}.jpg",
                             "prediction": reply})
    return pd.DataFrame(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    raw = {"DocVQA_VAL": docvqa_frame(rng), "ChartQA_TEST": chartqa_frame(rng),
           "MMBench_DEV_EN": mmbench_frame(rng), "MME": mme_frame(rng)}
    # Score what VLMEvalKit would read back (the round trip itself is timed below).
    frames = {name: roundtrip(frame) for name, frame in raw.items()}
    total_rows = sum(len(f) for f in frames.values())
    benchmarks = {name: get_benchmark(name) for name in frames}

    per_benchmark: dict[str, list[float]] = {name: [] for name in frames}
    totals = []
    for _ in range(args.repeats):
        start_all = time.perf_counter()
        for name, frame in frames.items():
            start = time.perf_counter()
            benchmarks[name].score(frame)
            per_benchmark[name].append(time.perf_counter() - start)
        totals.append(time.perf_counter() - start_all)

    print(f"scoring {total_rows} rows ({', '.join(f'{n} {len(f)}' for n, f in frames.items())}), "
          f"median of {args.repeats} runs:")
    for name, times in per_benchmark.items():
        print(f"  {name:<16} {statistics.median(times):.3f} s")
    print(f"  {'all four':<16} {statistics.median(totals):.3f} s   (target < 2 s)")

    with tempfile.TemporaryDirectory() as folder:
        paths = {name: write_prediction_file(frame, Path(folder) / f"bench_{name}.xlsx")
                 for name, frame in raw.items()}
        reads: dict[str, list[float]] = {name: [] for name in paths}
        read_totals = []
        for _ in range(max(1, min(args.repeats, 3))):
            start_all = time.perf_counter()
            for name, path in paths.items():
                start = time.perf_counter()
                read_prediction_file(path)
                reads[name].append(time.perf_counter() - start)
            read_totals.append(time.perf_counter() - start_all)
    print(f"reading the same as xlsx files (pandas.read_excel), median of {len(read_totals)} runs:")
    for name, times in reads.items():
        print(f"  {name:<16} {statistics.median(times):.3f} s")
    print(f"  {'all four':<16} {statistics.median(read_totals):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

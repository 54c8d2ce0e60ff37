"""bench/seam_eval.py judges what a listener hears from the answer's text alone; its figures in
RESULTS.md rest on these rules, so each is pinned on crafted answers (and the question sets
are checked to be what the harness promises)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import seam_eval as s  # noqa: E402


def test_a_restated_opener_is_found_loosely_and_only_at_the_start():
    assert s.restated("A mile is approximately 1.6 kilometers.", " a mile, is approximately 1.6 km")
    assert s.restated("Removing odor from inside your shoes is a", " You're right, removing odor from shoes")
    assert s.restated("Yes, dogs can eat grapes as", ' Here is a revised answer: "Yes, dogs can eat grapes')
    assert s.restated("To remove a stain from a carpet,", " Remove a stain from a carpet!")
    assert not s.restated("The capital of France", " is Paris. The capital of France is large.")
    assert not s.restated("The sky is", " blue because light scatters.")


def test_scaffold_restarts_and_endings_are_judged_from_the_text():
    assert s.scaffold(" The user asked: why?") and s.scaffold(" <opening>x</opening>") and s.scaffold(" ok [[redirect]]")
    assert not s.scaffold(" because light scatters.")
    assert s.restart_heard("The flu and the cold have two distinct", " The virus is small.")
    assert s.restart_heard("To make your WiFi faster at home,", " To improve your WiFi speed, move it.")
    assert not s.restart_heard("The capital of Australia is", " Canberra.")  # a name, not a new sentence
    assert not s.restart_heard("The sky is blue.", " It scatters light.")
    assert s.unfinished("Follow these steps:") and s.unfinished("It is made of")
    assert not s.unfinished('He said "stop."') and not s.unfinished("Done!")


def test_the_question_sets_are_the_size_the_harness_promises():
    questions = s.read_list(ROOT / "bench/seam/questions.txt")
    assert len(questions) >= 100 and len(set(questions)) == len(questions)
    wrong = [line.split("\t") for line in s.read_list(ROOT / "bench/seam/wrong_openers.txt")]
    assert len(wrong) >= 10 and all(len(pair) == 2 and pair[1].strip() for pair in wrong)

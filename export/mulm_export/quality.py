"""`verify --quality`: what a lower precision costs in the words a listener hears.

For each question of a built-in set (short assistant questions, written for this report) the
model and a float32 export of the same weights both run in onnxruntime:

* **greedy agreement**: fed the float32 model's greedy tokens (teacher forcing), how often the
  model under test picks the same next token, over `steps` tokens per question;
* **|Δlogit|**: the largest and the mean per-step largest logit difference on those steps;
* **identical openers**: each model decodes greedily on its own, and the first `words` words
  (the daemon's default opener length is 4–8; 8 is the longest it says) are compared as text.
  An answer that ends sooner is compared whole.

Greedy decoding is what the comparison needs: sampling would make two identical models differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .runner import OrtModel, greedy

QUESTIONS = [
    "What is the capital of France?",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "What should I cook for dinner tonight?",
    "How many days are in a leap year?",
    "Can you recommend a good book?",
    "How do I reset my router?",
    "What is the tallest mountain in the world?",
    "How can I sleep better?",
    "What is photosynthesis?",
    "Tell me a fun fact about octopuses.",
    "How do I make my plants grow faster?",
    "What is the difference between weather and climate?",
    "How long should I steep green tea?",
    "What are some tips for learning a new language?",
    "Is it going to rain tomorrow?",
    "How do I remove a coffee stain from a shirt?",
    "What is the speed of light?",
    "Why do cats purr?",
    "How do I start running if I'm a beginner?",
    "What does a solar panel do?",
    "How can I save money on groceries?",
    "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?",
    "How do vaccines work?",
    "What is a healthy breakfast?",
    "How do I turn off the living room lights?",
    "What time zone is Tokyo in?",
    "How do I clean a cast iron pan?",
    "What is the largest ocean on Earth?",
    "How can I stay focused while working from home?",
    "What is machine learning?",
    "How do I fix a squeaky door?",
    "Why do leaves change color in autumn?",
    "How much water should I drink each day?",
    "What is the best way to store fresh herbs?",
    "How do airplanes stay in the air?",
    "What are the planets in our solar system?",
    "How do I write a thank you note?",
    "What causes thunder?",
]

def _prompt(model: OrtModel, directory: Path, question: str) -> list[int]:
    import jinja2

    from .verify import prompt_ids

    text = jinja2.Environment().from_string(model.manifest["chat_template"]).render(
        messages=[{"role": "user", "content": question}], add_generation_prompt=True)
    return prompt_ids(directory, text)


def _opener(tokenizer, tokens: list[int], stop_ids: set[int], words: int) -> str:
    cut = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    return " ".join(tokenizer.decode(tokens[:cut], skip_special_tokens=True).split()[:words])


def report(directory: Path, baseline: Path, steps: int = 16, words: int = 8, questions: int | None = None) -> dict:
    """The quality report of `directory` against the float32 `baseline` (same weights)."""
    from tokenizers import Tokenizer

    model, base = OrtModel(directory), OrtModel(baseline)
    tokenizer = Tokenizer.from_file(str(Path(baseline) / "tokenizer.json"))
    stop_ids = {tokenizer.token_to_id(t) for t in base.manifest["special_tokens"]["stop"]} - {None}
    agree = total = identical = 0
    max_errs, rows = [], []
    for q in QUESTIONS[:questions]:
        ids = _prompt(base, Path(baseline), q)
        base.reset()
        base_tokens, base_logits = greedy(base.step, ids, steps)
        model.reset()
        feed = ids
        errs = []
        for tok, want in zip(base_tokens, base_logits):
            got = model.step(feed)
            errs.append(float(np.max(np.abs(got - want))))
            agree += int(np.argmax(got) == tok)
            total += 1
            feed = [tok]
        model.reset()
        own_tokens, _ = greedy(model.step, ids, steps)
        a, b = _opener(tokenizer, own_tokens, stop_ids, words), _opener(tokenizer, base_tokens, stop_ids, words)
        identical += int(a == b)
        max_errs.extend(errs)
        rows.append({"question": q, "opener": a, "float32_opener": b, "max_abs_error": max(errs)})
    n = len(rows)
    return {"dir": str(directory), "precision": model.manifest["precision"], "baseline": str(baseline),
            "questions": n, "steps": steps, "words": words,
            "greedy_agreement": agree / total, "max_abs_error": max(max_errs),
            "mean_max_abs_error": float(np.mean(max_errs)),
            "identical_openers": identical / n, "differing": [r for r in rows if r["opener"] != r["float32_opener"]]}

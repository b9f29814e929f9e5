"""Prompt sets for bench_speculative.py, built from CPython's ``pydoc_data.topics`` (the offline English
technical prose every Python install ships; documents chosen by key, so the set is the same on every machine).

COPY: answers that copy from the prompt (edit this code, quote from this passage, summarize with quotes), where
prompt lookup can draft. NO_COPY: open questions with nothing to copy.
"""

from __future__ import annotations

from pydoc_data.topics import topics

PASSAGE_KEYS = ("assert", "break", "continue", "del", "global", "pass", "return", "while")


def _passage(key: str, chars: int = 900) -> str:
    return topics[key][:chars].strip()


CODE = '''def mean(values):
    total = 0
    for v in values:
        total = total + v
    return total / len(values)
'''

COPY = [
    f"Rename the function to `average` and the variable `total` to `acc`, and return the whole code:\n{CODE}",
    *(f"Quote the first two sentences of this passage word for word:\n\n{_passage(k)}" for k in PASSAGE_KEYS[:4]),
    *(f"Summarize this passage in three sentences, quoting its key phrases:\n\n{_passage(k)}"
      for k in PASSAGE_KEYS[4:]),
]

NO_COPY = [
    "Write a short story about a lighthouse keeper.",
    "What are three good habits for learning a new language?",
    "Explain why the sky is blue to a ten-year-old.",
    "Give me a recipe idea for a rainy evening.",
]

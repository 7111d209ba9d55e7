"""Prompt concepts: c- of a prompt is the prompt with the phrase deleted (METHOD.md §5)."""

from __future__ import annotations

import re
from collections.abc import Sequence


def remove_phrase(prompt: str, phrase: str) -> str:
    """`prompt` with every occurrence of `phrase` deleted: c- of a prompt concept (METHOD.md §5).

    Matching is case-insensitive, on whole words, and any run of whitespace inside the phrase
    matches any whitespace in the prompt. The result has its whitespace collapsed and no space
    left before punctuation or dangling comma at either end.

    Raises ValueError when the phrase is empty or does not occur.

    Examples:
        >>> remove_phrase("a pikachu in the style of picasso", "a pikachu")
        'in the style of picasso'
        >>> remove_phrase("A red triangle", "red")
        'A triangle'
    """
    words = phrase.split()
    if not words:
        raise ValueError("the concept phrase is empty")
    pattern = re.compile(
        r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)", re.IGNORECASE
    )
    out, n = pattern.subn(" ", prompt)
    if n == 0:
        raise ValueError(f"concept phrase {phrase!r} does not occur in the prompt {prompt!r}")
    out = re.sub(r"\s+", " ", out).strip()
    out = re.sub(r"\s+([,.;:!?])", r"\1", out)
    return re.sub(r"^[,;:]\s*|\s*[,;:]$", "", out).strip()


def concept_prompts(
    prompt: str, concepts: Sequence[str] = (), negative_prompts: Sequence[str] = ()
) -> list[str]:
    """The c- prompts of a query: `prompt` minus each concept phrase, then the explicit negatives.

    Examples:
        >>> concept_prompts("a red triangle", ["red", "triangle"])
        ['a triangle', 'a red']
    """
    negs = [remove_phrase(prompt, c) for c in concepts] + list(negative_prompts)
    if not negs:
        raise ValueError("a concept query needs a concept phrase or a negative prompt")
    return negs

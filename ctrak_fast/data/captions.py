"""Captions of labelled images ("a red triangle"): the prompts of text-to-image models trained on
a ConceptDataset."""

from __future__ import annotations

# Where a factor's word goes: before the noun, as the noun, or in a phrase after it.
ADJECTIVES, NOUNS = ("colour",), ("shape",)
SUFFIX = {"texture": "with {}", "background": "on a {} background"}


def caption(factors: list[str], values: dict[str, list[str]], label_row, keep=None) -> str:
    """Caption of one labelled image; factors with keep[f] False are left out, "" if none is kept.

    Examples:
        >>> v = {"shape": ["circle", "triangle"], "colour": ["red", "blue"]}
        >>> caption(["shape", "colour"], v, [1, 0])
        'a red triangle'
        >>> caption(["shape", "colour"], v, [1, 0], keep=[False, True])
        'a red'
    """
    keep = [True] * len(factors) if keep is None else list(keep)
    if not any(keep):
        return ""
    pre, noun, suffix = [], [], []
    for f, v, k in zip(factors, label_row, keep, strict=True):
        if not k:
            continue
        word = values[f][int(v)]
        if f in ADJECTIVES:
            pre.append(word)
        elif f in NOUNS:
            noun.append(word)
        else:
            suffix.append(SUFFIX.get(f, f"with {f} {{}}").format(word))
    return " ".join(["a", *pre, *noun, *suffix])

"""`ctrak featurize|query --pipeline DIR` for a class-conditional pipeline (DiT): what differs from
the text pipelines of pipeline_cmds.py.

A DiT takes class labels, not prompts. A caption of --images and the query's --prompt name a class:
a name of the pipeline's id2label (model_index.json, as the released DiT folders keep it; each
comma-separated synonym is a name), or the class number. Anything else is refused, naming the
caption's image and the classes. The concept query is the class against the unconditional class
(DiT's CFG null class); each --negative-prompt CLASS adds a row against that class instead.
--concept, if given, must name the prompt's class (a class is removed whole).
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Sequence
from typing import Any


def is_class_conditional(adapter: Any) -> bool:
    from ctrak_fast.models.dit import DiTAdapter

    return isinstance(adapter, DiTAdapter)


def class_featurizer(adapter: Any, spec: Any, projection: Any, method: str) -> Any:
    """The DiT kind's featurizer with `method` recorded in its meta (the store then refuses a
    query of another method by name)."""
    from ctrak_fast.models.dit import DiTFeaturizer
    from ctrak_fast.models.registry import kind_of

    kind = kind_of(adapter)
    return DiTFeaturizer(adapter, kind.schedule, spec, projection, kind.null_cond, method=method)


def class_conds(adapter: Any, captions: Sequence[str], files: Sequence[Any]) -> Any:
    """int64 [N, 1] class conditions of the captions; InputError naming the first image whose
    caption names no class (before any image is read)."""
    from ctrak_fast.engine.validation import InputError

    for caption, file in zip(captions, files, strict=True):
        try:
            adapter.class_index(caption)
        except ValueError as e:
            raise InputError(f"{file}: its caption {e}") from None
    return adapter.class_ids(captions)


def class_index(adapter: Any, name: str, flag: str) -> int:
    from ctrak_fast.engine.validation import InputError

    try:
        return int(adapter.class_index(name))
    except ValueError as e:
        raise InputError(f"{flag} {e}") from None


def class_query(
    a: Namespace,
    adapter: Any,
    fz: Any,
    method: str,
    prompt: str,
    phrases: Sequence[str],
    negative_prompts: Sequence[str],
) -> Any:
    """The Query of --prompt's class (see the module docstring); whole-image methods: the
    method's loss on the query image under that class."""
    from ctrak_fast.api import core
    from ctrak_fast.data.images import load_image
    from ctrak_fast.engine.validation import InputError
    from ctrak_fast.method.methods import get_method
    from ctrak_fast.method.query import ConceptQuerySpec
    from ctrak_fast.models.registry import kind_of
    from ctrak_fast.results import Query

    kind = kind_of(adapter)
    row = get_method(method)
    pos = class_index(adapter, prompt, "--prompt")
    for phrase in phrases:
        if class_index(adapter, phrase, "--concept") != pos:
            raise InputError(
                f"--concept {phrase!r}: a DiT removes the prompt's class {prompt!r} whole; give "
                "another class as --negative-prompt"
            )
    negs = [class_index(adapter, n, "--negative-prompt") for n in negative_prompts]
    if a.scheduler:
        raise InputError("--scheduler: a DiT query image is sampled by ctrak's own DDIM")
    if a.image:
        image = load_image(a.image, kind.pixel_size())
    else:
        guidance = kind.guidance if a.guidance is None else a.guidance
        image = core.generate(kind, pos, seed=a.seed, guidance=guidance, steps=a.steps)[0]
    spec = ConceptQuerySpec(
        **{
            **row.concept,
            "draws": a.draws,
            "n_draws": a.n_draws or 4,
            "guidance": a.inversion_guidance,
            "steps": a.inversion_steps,
            "weight": kind.query_weight if a.weight is None else a.weight,
            "seed": a.seed,
            "timesteps": fz.spec.timesteps,
        }
    )
    if row.query != "concept" and (phrases or negative_prompts):
        raise InputError(f"{method} queries are whole-image: no --concept to remove")
    remove = "class" if phrases or not negs else None
    local = image if a.draws == "local" or row.query != "concept" else None
    q = core.query(kind, fz, method, spec, pos, remove, negs, local, None)
    labels = q.labels
    if row.query == "concept":  # the names given, not class numbers
        labels = ((f"-{prompt}",) if remove else ()) + tuple(f"vs {n!r}" for n in negative_prompts)
    meta = {**q.meta, "concept": prompt, "prompt": prompt, "method": method, "class": pos}
    return Query(q.features, labels, meta, image)  # global draws too show the class's sample

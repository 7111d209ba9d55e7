"""The benchmark's query sampler (bench/queries.py): contrast guidance against its formula, the
judge's confidence floor, and the CLI defaults of `bench paper` beside the plain ones."""

from __future__ import annotations

import pytest
import torch

from ctrak_fast.bench.queries import ContrastGuided, make_queries
from ctrak_fast.models.factor_unet import FactorUNet


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = FactorUNet([3, 2], image_size=8, block_out_channels=(8, 16), attention=(False, True))
    with torch.no_grad():  # random weights everywhere: diffusers zero-inits output layers
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def reference(model, x, t, cond, weight):
    """eps(c) + w * sum_f mean_{v != c_f} (eps(c) - eps(c, f=v)), a sample at a time; null
    factors are left out."""
    out = []
    for i in range(len(x)):
        xi, ti, ci = x[i : i + 1], t[i : i + 1], cond[i : i + 1]
        e = model(xi, ti, ci)
        total = e.clone()
        for f, n in enumerate(model.n_values):
            if int(ci[0, f]) == n:
                continue
            others = [v for v in range(n) if v != int(ci[0, f])]
            diff = torch.zeros_like(e)
            for v in others:
                cv = ci.clone()
                cv[0, f] = v
                diff += e - model(xi, ti, cv)
            total += weight * diff / len(others)
        out.append(total)
    return torch.cat(out)


@torch.no_grad()
def test_contrast_guidance_matches_its_formula_on_a_mixed_batch(unet):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 8, 8, generator=g)
    t = torch.tensor([10, 500, 999, 0, 250])
    # every value of the 3-valued factor, and null tokens (3 and 2) on either factor
    cond = torch.tensor([[0, 1], [1, 0], [2, 1], [3, 0], [1, 2]])
    got = ContrastGuided(unet, 2.5)(x, t, cond)
    want = reference(unet, x, t, cond, 2.5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # weight 0 is the model itself; the all-null condition (CFG's) is never contrasted
    torch.testing.assert_close(ContrastGuided(unet, 0.0)(x, t, cond), unet(x, t, cond))
    null = unet.null_cond(5)
    torch.testing.assert_close(ContrastGuided(unet, 4.0)(x, t, null), unet(x, t, null))


class FixedJudge:
    """A judge whose verdicts are given: sample i gets predictions pred[i], confidences conf[i]."""

    def __init__(self, pred, conf):
        self.pred, self.conf = torch.tensor(pred), torch.tensor(conf)

    def predict_with_confidence(self, images):
        return self.pred[: len(images)], self.conf[: len(images)]


def test_queries_need_every_factor_right_and_above_the_confidence_floor(unet):
    pred = [[0, 1], [0, 1], [1, 1], [0, 1]]
    conf = [[0.99, 0.99], [0.99, 0.50], [1.0, 1.0], [0.96, 0.97]]
    judge = FixedJudge(pred, conf)
    kw = {"keep": 2, "candidates": 4, "guidance": 1.0, "progress": False}
    queries, accepted = make_queries(unet, judge, [(0, 1)], min_confidence=0.95, **kw)
    assert accepted == {(0, 1): (2, 4)}  # sample 1 is unsure of factor 1, sample 2 is wrong
    assert len(queries) == 2 and all(q["combo"] == (0, 1) for q in queries)
    _, argmax_only = make_queries(unet, judge, [(0, 1)], **kw)
    assert argmax_only == {(0, 1): (3, 4)}
    unconfirmed, _ = make_queries(unet, judge, [(0, 1)], min_confidence=1.0, confirm=False, **kw)
    assert len(unconfirmed) == 2  # confirm=False keeps the first ones whatever the judge says


def test_contrast_queries_are_drawn_from_the_contrast_guided_sampler(unet):
    judge = FixedJudge([[0, 1]] * 4, [[1.0, 1.0]] * 4)
    kw = {"keep": 2, "candidates": 4, "guidance": 1.0, "progress": False, "seed": 5}
    plain, _ = make_queries(unet, judge, [(0, 1)], **kw)
    contrast, _ = make_queries(unet, judge, [(0, 1)], contrast=3.0, **kw)
    assert not torch.allclose(plain[0]["image"], contrast[0]["image"])
    again, _ = make_queries(unet, judge, [(0, 1)], contrast=3.0, **kw)
    assert torch.equal(again[0]["image"], contrast[0]["image"])  # seeded


def test_judge_confidence_is_the_softmax_of_its_prediction():
    from ctrak_fast.models.factor_unet import ConceptJudge

    torch.manual_seed(0)
    judge = ConceptJudge([3, 2], width=8, image_size=8).eval()
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    pred, conf = judge.predict_with_confidence(x, batch_size=4)
    assert torch.equal(pred, judge.predict(x))
    with torch.no_grad():
        probs = [lg.softmax(-1) for lg in judge(x)]
    for f, p in enumerate(probs):
        torch.testing.assert_close(conf[:, f], p.gather(1, pred[:, f : f + 1])[:, 0])


def test_bench_paper_defaults_to_the_contrast_sampler_and_demo_to_plain_cfg():
    from ctrak_fast.cli.app import PAPER_QUERIES, PLAIN_QUERIES, build_parser

    parse = build_parser().parse_args
    for argv, want in (
        (["demo"], PLAIN_QUERIES),
        (["bench", "quality"], PLAIN_QUERIES),
        (["bench", "paper"], PAPER_QUERIES),
    ):
        a = parse(argv)
        got = {
            "guidance": a.query_guidance,
            "contrast": a.query_contrast,
            "confidence": a.query_confidence,
            "candidates": a.query_candidates,
        }
        assert got == want, argv
    assert parse(["bench", "paper", "--query-contrast", "0"]).query_contrast == 0.0


def test_paper_table_averages_the_two_concepts_of_each_split():
    from ctrak_fast.bench.paper import paper_table, split_mean

    def cell(p, lo, hi, oracle):
        return {"p@10": p, "p@10_ci": [lo, hi], "p@10_oracle": oracle}

    results = {
        "methods": {
            "d-trak": {
                "in_distribution": {
                    "shape": cell(1.0, 1.0, 1.0, 1.0),
                    "colour": cell(1.0, 1, 1, 1),
                },
                "heldout": {"shape": cell(0.3, 0.1, 0.5, 0.6), "colour": cell(0.7, 0.5, 0.9, 1.0)},
            },
            "concept-trak-cond": {
                "in_distribution": {"shape": cell(1.0, 1, 1, 1), "colour": cell(0.9, 0.8, 1, 1)},
                "heldout": {"shape": cell(1.0, 1, 1, 1), "colour": cell(0.9, 0.8, 1.0, 1.0)},
            },
        },
        "calibration": {
            name: {s: {"shape": {"p@10": v}, "colour": {"p@10": v}} for s in ("id", "held")}
            for name, v in (("random", 0.4), ("random_oracle", 0.7))
        },
        "n_queries": {"in_distribution": 12, "heldout": 8},
        "n_train": 600,
        "k": 2048,
    }
    assert split_mean(results, "d-trak", "heldout", "p@10") == pytest.approx(0.5)
    table = paper_table(results).splitlines()
    d_trak = next(line for line in table if line.startswith("| d-trak |"))
    # oracle ID / held-out, then ours with the mean CI ends, then the paper's published figures
    assert (
        d_trak == "| d-trak | 1.00 / 0.80 | 1.00 [1.00, 1.00] / 0.50 [0.30, 0.70] | 1.00 / 0.50 |"
    )
    ours = next(line for line in table if line.startswith("| concept-trak-cond (ours) |"))
    assert ours.endswith("| 0.95 [0.90, 1.00] / 0.95 [0.90, 1.00] | - |")
    assert "| random ranking | 0.70 / 0.70 | 0.40 / 0.40 | - |" in table
    assert table[-1].startswith("Test queries: 12 ID, 8 held-out; n_train=600, k=2048.")

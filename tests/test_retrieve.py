"""Exact chunked search and retrieval metrics, against brute force, scikit-learn and FAISS."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from toolkit.errors import ConfigError
from toolkit.retrieve import chunks, faiss_topk, retrieval_metrics, topk_search


def _feats(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def _brute(q, g, k, exclude=None):
    s = q @ g.T
    if exclude is not None:
        s[torch.arange(len(q)), exclude] = float("-inf")
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return s.gather(1, order), order


@pytest.mark.parametrize("chunk", [1, 7, 50, 1000])
def test_chunked_topk_equals_brute_force_for_any_chunk_size(chunk):
    q, g = _feats(9, seed=1), _feats(200, seed=2)
    s, i = topk_search(q, chunks(g, chunk), 5)
    bs, bi = _brute(q, g, 5)
    assert torch.equal(i, bi)
    assert torch.allclose(s, bs, atol=1e-6)


def test_exclude_leaves_out_each_querys_own_row():
    g = _feats(50)
    q = g[[3, 10, 49]]
    s, i = topk_search(q, chunks(g, 8), 4, exclude=torch.tensor([3, 10, 49]))
    assert not (i == torch.tensor([[3], [10], [49]])).any()
    bs, bi = _brute(q, g, 4, exclude=torch.tensor([3, 10, 49]))
    assert torch.equal(i, bi)


def test_ties_go_to_the_earlier_row_whatever_the_chunking():
    g = torch.tensor([[1.0, 0.0]] * 6)  # all identical: every score ties
    q = torch.tensor([[1.0, 0.0]])
    for chunk in (1, 2, 4, 6):
        _, i = topk_search(q, chunks(g, chunk), 3)
        assert i.tolist() == [[0, 1, 2]]


def test_k_larger_than_the_gallery_returns_the_whole_gallery_once():
    g = _feats(4)
    s, i = topk_search(g[:1], chunks(g, 3), 10, exclude=torch.tensor([0]))
    assert sorted(i[0].tolist()) == [1, 2, 3] and torch.isfinite(s).all()


def test_faiss_flat_index_gives_the_same_results_as_exact_search():
    pytest.importorskip("faiss")
    q, g = _feats(20, 32, seed=3), _feats(500, 32, seed=4)
    fs, fi = faiss_topk(q, g, 10)
    s, i = topk_search(q, chunks(g, 64), 10)
    assert torch.equal(fi, i)
    assert torch.allclose(fs, s, atol=1e-5)


# ------------------------------------------------------------------------------------------
# metrics


def test_hand_made_case_with_known_answers():
    # One query along x. Gallery ranked by similarity: rows 0 (rel), 1 (not), 2 (rel), 3 (not).
    q = torch.tensor([[1.0, 0.0]])
    g = F.normalize(torch.tensor([[1.0, 0.05], [1.0, 0.3], [1.0, 0.8], [0.0, 1.0]]), dim=1)
    res = retrieval_metrics(q, torch.tensor([7]), g, torch.tensor([7, 1, 7, 1]), ks=[1, 2, 3, 4])
    assert res["precision@1"] == 1.0 and res["precision@2"] == 0.5
    assert res["precision@3"] == pytest.approx(2 / 3) and res["precision@4"] == 0.5
    assert res["recall@1"] == 0.5 and res["recall@2"] == 0.5 and res["recall@3"] == 1.0
    assert res["hit_rate@1"] == 1.0
    assert res["mAP"] == pytest.approx((1 / 1 + 2 / 3) / 2)  # precision at ranks 1 and 3
    # The reports' example: 5 results per query, "accuracy" = share of the 5 in the query's group.
    q2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    res2 = retrieval_metrics(q2, torch.tensor([7, 1]), g, torch.tensor([7, 1, 7, 1]), ks=[2])
    # query 2 (along y) ranks rows 3 (rel), 2, 1 (rel), 0: precision@2 = 1/2; query 1: 1/2.
    assert res2["precision@2"] == 0.5
    assert res2["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + (1 + 2 / 3) / 2) / 2)


def _reference(qf, ql, gf, gl, ks, loo):
    """Per-query direct computation with scikit-learn's average_precision_score."""
    from sklearn.metrics import average_precision_score

    out = {f"{m}@{k}": [] for k in ks for m in ("precision", "hit_rate", "recall")}
    aps = []
    for i in range(len(qf)):
        s = (gf @ qf[i]).numpy().astype("float64")
        rel = (gl == ql[i]).numpy()
        keep = [j for j in range(len(gf)) if not (loo and j == i)]
        s, rel = s[keep], rel[keep]
        order = sorted(range(len(s)), key=lambda j: -s[j])
        for k in ks:
            top = rel[order[:k]].sum()
            out[f"precision@{k}"].append(top / k)
            out[f"hit_rate@{k}"].append(float(top > 0))
            if rel.sum():
                out[f"recall@{k}"].append(top / rel.sum())
        if rel.sum():
            aps.append(average_precision_score(rel, s))
    res = {key: sum(v) / len(v) for key, v in out.items()}
    res["mAP"] = sum(aps) / len(aps)
    return res


@pytest.mark.parametrize("loo", [True, False])
def test_metrics_agree_with_a_scikit_learn_reference_on_random_labelled_features(loo):
    gf, gl = _feats(120, 8, seed=5), torch.randint(0, 6, (120,), generator=torch.Generator().manual_seed(6))
    if loo:
        qf, ql = gf, gl
    else:
        qf, ql = _feats(30, 8, seed=7), torch.randint(0, 6, (30,), generator=torch.Generator().manual_seed(8))
    ks = [1, 5, 10]
    got = retrieval_metrics(qf, ql, gf, gl, ks, leave_one_out=loo)
    want = _reference(qf, ql, gf, gl, ks, loo)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    # small query blocks (bounded memory) change nothing
    tiny = retrieval_metrics(qf, ql, gf, gl, ks, leave_one_out=loo, block_elements=1)
    assert {k: tiny[k] for k in want} == pytest.approx({k: got[k] for k in want})


def test_metrics_agree_with_torchmetrics_retrieval_map():
    """torchmetrics 1.9 counts an item as relevant only where its score is > 0 (it assumes
    probabilities), and cosine similarities go negative; shifted scores rank the same."""
    from torchmetrics.retrieval import RetrievalMAP, RetrievalPrecision

    qf, ql = _feats(25, 8, seed=9), torch.randint(0, 4, (25,), generator=torch.Generator().manual_seed(10))
    gf, gl = _feats(80, 8, seed=11), torch.randint(0, 4, (80,), generator=torch.Generator().manual_seed(12))
    got = retrieval_metrics(qf, ql, gf, gl, [5])
    s = qf @ gf.T + 2.0  # (25, 80), all > 0
    target = ql[:, None] == gl[None, :]
    idx = torch.arange(25)[:, None].expand_as(s)
    assert got["mAP"] == pytest.approx(RetrievalMAP()(s.flatten(), target.flatten(), idx.flatten()).item(), abs=1e-6)
    p5 = RetrievalPrecision(top_k=5)(s.flatten(), target.flatten(), idx.flatten()).item()
    assert got["precision@5"] == pytest.approx(p5, abs=1e-6)


def test_unknown_labels_and_queries_without_relevant_images():
    gf = _feats(10, 4)
    gl = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, -1, -1])
    ql = torch.tensor([0, 5, -1])  # class 5 has nothing in the gallery; -1 is skipped
    res = retrieval_metrics(gf[:3], ql, gf, gl, [2])
    assert res["queries"] == 2 and res["queries_without_relevant"] == 1
    assert not math.isnan(res["mAP"])
    with pytest.raises(ConfigError, match="no query has a known class"):
        retrieval_metrics(gf[:1], torch.tensor([-1]), gf, gl, [1])
    with pytest.raises(ConfigError, match="--topk"):
        retrieval_metrics(gf, gl, gf, gl, [10], leave_one_out=True)  # gallery minus the query is 9


def test_euclidean_from_a_rounded_cosine_of_itself_is_zero():
    import torch

    from toolkit.retrieve import euclidean_from_cosine

    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(2000, 2048, generator=g), dim=1)
    cos = (v * v).sum(1)  # float32: a unit vector with itself, rounded (0.99999994 .. 1.0000001)
    assert all(euclidean_from_cosine(c) == 0.0 for c in cos.tolist())
    assert euclidean_from_cosine(0.0) == pytest.approx(2 ** 0.5) and euclidean_from_cosine(-1.0) == 2.0
    assert euclidean_from_cosine(0.9999) == pytest.approx((2 - 2 * 0.9999) ** 0.5)
    for seed in range(20):  # many draws: not a matter of rounding luck
        w = torch.nn.functional.normalize(torch.randn(200, 2048, generator=g.manual_seed(seed)), dim=1)
        assert all(euclidean_from_cosine(c) == 0.0 for c in (w * w).sum(1).tolist())

"""OOD scores, detection metrics and probes against small hand-computable cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from noisystudent.analysis.probes import linear_probe_accuracy
from noisystudent.analysis.scores import (
    KNNScorer,
    MahalanobisScorer,
    auroc,
    energy_score,
    entropy_score,
    fpr_at_tpr,
    msp_score,
)
from noisystudent.data.selection import OODFilter


def test_msp_and_entropy_by_hand():
    probs = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert np.allclose(msp_score(probs), [0.0, 0.5, 2 / 3])
    assert np.allclose(entropy_score(probs), [0.0, math.log(2), math.log(3)], atol=1e-9)


def test_energy_is_minus_logsumexp():
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0)) * 5
    expected = -torch.logsumexp(logits.double(), dim=1).numpy()
    assert np.allclose(energy_score(logits.numpy()), expected, atol=1e-6)
    assert np.allclose(energy_score(logsumexp=-expected), expected)
    # a confident, large-logit image has lower energy (looks more in-distribution) than a flat one
    assert energy_score(np.array([[10.0, 0.0], [0.1, 0.0]]))[0] < energy_score(np.array([[10.0, 0.0], [0.1, 0.0]]))[1]


def test_mahalanobis_exact_small_case():
    # both classes: the same 4 centred points (+-1, 0), (0, +-2) -> shared covariance diag(0.5, 2)
    offsets = np.array([[1, 0], [-1, 0], [0, 2], [0, -2]], float)
    feats = np.concatenate([offsets, offsets + [10, 0]])
    labels = np.array([0] * 4 + [1] * 4)
    scorer = MahalanobisScorer.fit(feats, labels, num_classes=2)
    assert np.allclose(scorer.means, [[0, 0], [10, 0]])
    # (1,1): to class 0 1/0.5 + 1/2 = 2.5, to class 1 81/0.5 + 0.5 = 162.5 -> min 2.5
    assert np.allclose(scorer(np.array([[0.0, 0.0], [1.0, 1.0], [10.0, 2.0]])), [0.0, 2.5, 2.0], atol=1e-4)


def test_mahalanobis_recovers_known_gaussians():
    rng = np.random.default_rng(0)
    cov = np.array([[2.0, 0.8], [0.8, 1.0]])
    means = np.array([[0.0, 0.0], [6.0, -3.0]])
    feats = np.concatenate([rng.multivariate_normal(m, cov, 20000) for m in means])
    labels = np.repeat([0, 1], 20000)
    scorer = MahalanobisScorer.fit(feats, labels, num_classes=2)
    q = np.array([[1.0, 1.0], [5.0, -2.0], [3.0, 5.0]])
    prec = np.linalg.inv(cov)
    truth = np.min([[(x - m) @ prec @ (x - m) for m in means] for x in q], axis=1)
    assert np.allclose(scorer(q), truth, rtol=0.03)


def test_knn_distance_on_unit_vectors():
    bank = np.array([[1.0, 0.0], [0.0, 3.0]])  # normalised to (1,0), (0,1)
    q = np.array([[2.0, 0.0], [1.0, 1.0]])
    assert np.allclose(KNNScorer.fit(bank, k=1)(q), [0.0, math.sqrt(2 - math.sqrt(2))])
    assert np.allclose(KNNScorer.fit(bank, k=2)(q), [math.sqrt(2), math.sqrt(2 - math.sqrt(2))])


def test_auroc_known_cases():
    y = np.array([0, 0, 1, 1], bool)
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), y) == 1.0
    assert auroc(np.array([0.8, 0.9, 0.1, 0.2]), y) == 0.0
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), y) == 0.5
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), y) == 0.75  # 3 of 4 (ood, id) pairs ordered right
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([False, False])))
    rng = np.random.default_rng(1)
    s, yy = rng.normal(size=500), rng.random(500) < 0.3
    s[yy] += 1.0
    from sklearn.metrics import roc_auc_score  # an independent implementation

    assert auroc(s, yy) == pytest.approx(roc_auc_score(yy, s), abs=1e-12)


def test_fpr_at_95_tpr():
    id_scores, ood_scores = np.arange(1, 101, dtype=float), np.arange(50, 150, dtype=float)
    s = np.concatenate([id_scores, ood_scores])
    y = np.r_[np.zeros(100, bool), np.ones(100, bool)]
    assert fpr_at_tpr(s, y) == pytest.approx(0.46)  # threshold 95 keeps 95 ID; OOD 50..95 pass
    assert fpr_at_tpr(np.r_[np.zeros(20), np.ones(20)], np.r_[np.zeros(20, bool), np.ones(20, bool)]) == 0.0


def test_ood_filter_drops_exact_count_of_highest_scores():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.2, 0.7, 0.3, 0.0, 0.8, 0.4])
    keep = OODFilter(0.3)(scores)
    assert keep.sum() == 7 and not keep[[1, 3, 8]].any()
    assert OODFilter(0.0)(scores).all()


def test_linear_probe_separable_vs_random_labels():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 5
    y = rng.integers(0, 3, 600)
    x = centers[y] + rng.normal(size=(600, 16))
    assert linear_probe_accuracy(x[:300], y[:300], x[300:], y[300:]) == 1.0
    noise = rng.normal(size=(600, 16))
    assert linear_probe_accuracy(noise[:300], y[:300], noise[300:], y[300:]) < 0.6  # chance is 1/3


def test_auroc_matches_sklearn_with_heavy_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    for dtype in (np.float64, np.float32):
        scores = rng.integers(0, 12, 5000).astype(dtype) / 7  # a dozen distinct values: ties everywhere
        is_ood = rng.random(5000) < 0.1 + 0.05 * (scores > 1)
        assert auroc(scores, is_ood) == pytest.approx(roc_auc_score(is_ood, scores), abs=1e-12)
    cont = rng.normal(size=3000)
    y = rng.random(3000) < 0.3
    assert auroc(cont + y, y) == pytest.approx(roc_auc_score(y, cont + y), abs=1e-12)


def test_knn_bank_is_capped_by_a_seeded_subsample():
    from noisystudent.analysis.scores import OODScorers
    from noisystudent.config import AnalysisConfig

    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(500, 8)).astype(np.float32), rng.integers(0, 4, 500)
    capped = OODScorers.fit(feats, labels, 4, AnalysisConfig(knn_k=5, knn_bank_size=100), seed=7)
    again = OODScorers.fit(feats, labels, 4, AnalysisConfig(knn_k=5, knn_bank_size=100), seed=7)
    whole = OODScorers.fit(feats, labels, 4, AnalysisConfig(knn_k=5, knn_bank_size=500), seed=7)
    assert capped.knn.bank.shape == (100, 8) and torch.equal(capped.knn.bank, again.knn.bank)
    assert whole.knn.bank.shape == (500, 8)
    # every banked row is one of the labeled features; the Mahalanobis fit still sees all of them
    normed = torch.nn.functional.normalize(torch.as_tensor(feats), dim=1)
    assert ((capped.knn.bank @ normed.T).max(dim=1).values > 1 - 1e-6).all()
    assert np.array_equal(capped.mahalanobis.means, whole.mahalanobis.means)


def _timm_split(model_name: str = "resnet18", n: int = 64):
    """A real timm model's pooled features and logits for random images (eval mode)."""
    import timm

    from noisystudent.analysis.features import SplitFeatures
    from noisystudent.models import pooled_and_logits

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=5, in_chans=1).eval()
    with torch.inference_mode():
        pooled, logits = pooled_and_logits(model, torch.rand(n, 1, 32, 32))
    return model, SplitFeatures(pooled.numpy(), logits.numpy(), np.arange(n) % 5)


def test_react_and_scale_recompute_logits_through_the_models_own_classifier():
    """The stored-feature path (a LinearHead in numpy) against the model's fc module in torch."""
    from noisystudent.analysis.features import linear_head
    from noisystudent.analysis.scores import ReActScorer, ScaleScorer

    model, split = _timm_split()
    head = linear_head(model, split)
    assert head is not None and head.weight.shape == (5, split.pooled.shape[1])
    fc = model.get_classifier()
    h = torch.as_tensor(split.pooled, dtype=torch.float64)
    react = ReActScorer.fit(head, split.pooled, 90.0)
    assert react.clip == pytest.approx(float(np.percentile(split.pooled, 90.0)), rel=1e-6)
    with torch.no_grad():
        clipped = fc.double()(h.clamp(max=react.clip))
    assert np.allclose(react(split.pooled), -torch.logsumexp(clipped, 1).numpy(), atol=1e-8)
    cut = torch.quantile(h, 0.85, dim=1, keepdim=True)
    ratio = h.sum(1) / torch.where(h >= cut, h, torch.zeros_like(h)).sum(1)
    with torch.no_grad():
        scaled = fc(h * torch.exp(ratio)[:, None])
    assert np.allclose(ScaleScorer(head, 85.0)(split.pooled), -torch.logsumexp(scaled, 1).numpy(), atol=1e-6)
    assert (ratio >= 1).all()  # ReLU features: the top 15% never hold more than all of it


def test_a_classifier_that_is_not_one_linear_layer_on_the_features_gives_no_head():
    from noisystudent.analysis.features import SplitFeatures, linear_head

    model, split = _timm_split()
    assert linear_head(model, SplitFeatures(split.pooled, split.logits + 3.0, split.targets)) is None  # not its logits
    model.reset_classifier(0)  # timm: no classifier at all (Identity)
    assert linear_head(model, split) is None


def test_vim_finds_features_off_the_labeled_principal_subspace_that_energy_misses():
    """In-distribution features live near an 8-dimensional subspace of 64; OOD ones have the same
    logits but a large component outside it. ViM separates them; the energy score cannot."""
    from noisystudent.analysis.scores import LinearHead, ViMScorer

    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(64, 64)))[0]
    inside, outside = basis[:, :8], basis[:, 8:]
    weight = rng.normal(size=(5, 8)) @ inside.T  # the classifier reads only the subspace
    head = LinearHead(weight, rng.normal(size=5))
    labeled = rng.normal(size=(2000, 8)) * 3 @ inside.T + 0.05 * rng.normal(size=(2000, 56)) @ outside.T
    in_dist = rng.normal(size=(300, 8)) * 3 @ inside.T + 0.05 * rng.normal(size=(300, 64))
    ood = rng.normal(size=(300, 8)) * 3 @ inside.T + rng.normal(size=(300, 56)) @ outside.T
    vim = ViMScorer.fit(head, labeled, dim=8)
    is_ood = np.r_[np.zeros(300), np.ones(300)].astype(bool)
    both = np.r_[in_dist, ood]
    assert auroc(vim(both), is_ood) > 0.99
    assert 0.4 < auroc(energy_score(head.logits(both)), is_ood) < 0.6
    # about the origin, a feature inside the subspace has (almost) no residual: its score is -logsumexp
    point = vim.origin + inside @ rng.normal(size=8) * 3
    energy = -np.log(np.exp(head.logits(point[None])).sum())
    residual = (vim(point[None])[0] - energy) / vim.alpha
    assert 0 <= residual < 0.1 * 0.05 * np.sqrt(56)  # a tenth of the labeled features' own residual
    with pytest.raises(ValueError, match="analysis.vim_dim=64"):
        ViMScorer.fit(head, labeled, dim=64)


def test_the_best_score_is_chosen_on_a_validation_split_and_judged_on_the_rest():
    """A score that is perfect only on the validation images wins the choice, and the AUROC
    reported for it is its held-out one (chance), not the 0.75 of all tagged images together."""
    from noisystudent.analysis.measure import pick_best_score

    n, seed = 4000, 3
    rng = np.random.default_rng(1)
    is_ood = rng.random(n) < 0.3
    validation = np.random.default_rng(seed).random(n, dtype=np.float32) < 0.5  # the split it draws
    lucky = np.where(validation, is_ood.astype(float), rng.random(n))
    honest = is_ood * 0.6 + rng.random(n)
    choice = pick_best_score({"honest": honest, "lucky": lucky}, is_ood, 0.5, seed)
    assert choice.score == "lucky" and choice.validation_auroc["lucky"] == 1.0
    assert auroc(lucky, is_ood) > 0.7 and abs(choice.test_auroc - 0.5) < 0.05
    assert choice.validation_ood + choice.test_ood == is_ood.sum()

"""The distillation math against values worked out by hand (no Ray)."""
import math

import pytest
import torch

from kd_ray.core.losses import (
    ensemble_average,
    kd_loss,
    logit_matching_loss,
    resoften,
    soft_cross_term,
    soften,
)


def test_soften_is_softmax_at_temperature():
    z = torch.tensor([[2.0 * math.log(3.0), 0.0]])
    # softmax([ln 3, 0]) = [3/4, 1/4]
    assert torch.allclose(soften(z, 2.0), torch.tensor([[0.75, 0.25]]))
    with pytest.raises(ValueError, match="temperature"):
        soften(z, 0.0)


def test_kd_loss_golden_values_by_hand():
    # Soft term: p = [1/2, 1/2], q = softmax([2 ln 3, 0] / 2) = [3/4, 1/4]
    #   KL(p||q) = 1/2 ln(2/3) + 1/2 ln 2 = 0.1438410362; times T^2 = 4 -> 0.5753641449
    # Hard term: softmax([2 ln 3, 0]) = [9/10, 1/10], label 0 -> -ln 0.9 = 0.1053605157
    z = torch.tensor([[2.0 * math.log(3.0), 0.0]])
    p = torch.tensor([[0.5, 0.5]])
    y = torch.tensor([0])
    total, terms = kd_loss(z, p, y, T=2.0, alpha=0.5)
    assert terms["soft"].item() == pytest.approx(0.5753641449, abs=1e-6)
    assert terms["hard"].item() == pytest.approx(0.1053605157, abs=1e-6)
    assert total.item() == pytest.approx(0.5 * 0.5753641449 + 0.5 * 0.1053605157, abs=1e-6)
    # alpha = 1: soft only (labels not needed); alpha = 0: plain cross-entropy
    assert kd_loss(z, p, None, T=2.0, alpha=1.0)[0].item() == pytest.approx(0.5753641449, abs=1e-6)
    assert kd_loss(z, None, y, T=2.0, alpha=0.0)[0].item() == pytest.approx(0.1053605157, abs=1e-6)


def test_kd_loss_batch_average_and_second_golden():
    # p = [3/4, 1/4], q = [1/2, 1/2] at T = 1: KL = 3/4 ln 1.5 + 1/4 ln 0.5 = 0.1308120...
    z = torch.zeros(2, 2)
    p = torch.tensor([[0.75, 0.25], [0.5, 0.5]])  # second row has KL 0 -> batch mean halves it
    _, terms = kd_loss(z, p, None, T=1.0, alpha=1.0)
    expected = 0.5 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert terms["soft"].item() == pytest.approx(expected, abs=1e-6)


def test_kl_is_zero_when_student_equals_teacher():
    torch.manual_seed(0)
    z = torch.randn(8, 10)
    for T in (1.0, 3.0, 20.0):
        assert soft_cross_term(z, soften(z, T), T).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_gradient_is_q_minus_p_over_T():
    """Paper eq. 2: dC/dz_i = (q_i - p_i) / T for the soft cross term (before T^2)."""
    torch.manual_seed(1)
    T = 3.0
    z = torch.randn(1, 10, requires_grad=True)
    p = soften(torch.randn(1, 10), T)
    soft_cross_term(z, p, T).backward()
    expected = (soften(z.detach(), T) - p) / T
    assert torch.allclose(z.grad, expected, atol=1e-6)
    # and kd_loss with alpha = 1 carries exactly T^2 times that gradient
    z2 = z.detach().clone().requires_grad_(True)
    kd_loss(z2, p, None, T=T, alpha=1.0)[0].backward()
    assert torch.allclose(z2.grad, T * T * expected, atol=1e-5)


def test_high_temperature_approaches_logit_matching():
    """Paper 2.1: with zero-mean logits and large T, T^2 dC/dz -> (z - v) / N."""
    torch.manual_seed(2)
    z0 = torch.randn(4, 10)
    v = torch.randn(4, 10)
    z0 = z0 - z0.mean(-1, keepdim=True)
    v = v - v.mean(-1, keepdim=True)
    z_kd = z0.clone().requires_grad_(True)
    kd_loss(z_kd, soften(v, 1000.0), None, T=1000.0, alpha=1.0)[0].backward()
    z_lm = z0.clone().requires_grad_(True)
    logit_matching_loss(z_lm, v).backward()
    assert torch.allclose(z_lm.grad, (z0 - v) / 10 / 4, atol=1e-7)
    rel = (z_kd.grad - z_lm.grad).norm() / z_lm.grad.norm()
    assert rel < 1e-2
    # at T = 1 the two differ clearly
    z1 = z0.clone().requires_grad_(True)
    kd_loss(z1, soften(v, 1.0), None, T=1.0, alpha=1.0)[0].backward()
    assert (z1.grad - z_lm.grad).norm() / z_lm.grad.norm() > 0.1


def test_probability_and_logit_averaging_each_match_direct_computation():
    logits = torch.tensor([[[4.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])  # K=2, B=1, C=3
    T = 2.0
    e2 = math.exp(2.0)
    # probs: mean of softmax([2,0,0]) = [e2, 1, 1]/(e2+2) and uniform [1/3]*3
    direct_probs = torch.tensor([[(e2 / (e2 + 2) + 1 / 3) / 2, (1 / (e2 + 2) + 1 / 3) / 2, (1 / (e2 + 2) + 1 / 3) / 2]])
    # logits: softmax(mean logit [2, 0, 0] / 2) = softmax([1, 0, 0])
    e1 = math.exp(1.0)
    direct_logits = torch.tensor([[e1 / (e1 + 2), 1 / (e1 + 2), 1 / (e1 + 2)]])
    got_p = ensemble_average(logits, T, "probs")
    got_l = ensemble_average(logits, T, "logits")
    assert torch.allclose(got_p, direct_probs, atol=1e-6)
    assert torch.allclose(got_l, direct_logits, atol=1e-6)
    assert not torch.allclose(got_p, got_l, atol=1e-3)
    with pytest.raises(ValueError, match="rule"):
        ensemble_average(logits, T, "median")


def test_resoften_from_float16_logits():
    torch.manual_seed(3)
    logits = torch.randn(3, 5, 10)  # K, B, C
    stored = logits.transpose(0, 1).to(torch.float16)  # B, K, C as the cache keeps them
    got = resoften(stored, 2.0)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ensemble_average(logits, 2.0), atol=2e-3)
    assert torch.allclose(got.sum(-1), torch.ones(5), atol=1e-6)


def test_kd_loss_rejects_class_mismatch_and_bad_alpha():
    z = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="class counts"):
        kd_loss(z, torch.full((2, 5), 0.2), None, T=1.0, alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(z, None, torch.zeros(2, dtype=torch.long), T=1.0, alpha=1.5)


def test_mixed_labels_weight_the_cross_entropy_of_both_images():
    from kd_ray.core.losses import mixed_labels

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    y, y2, w = torch.tensor([0, 2]), torch.tensor([1, 2]), torch.tensor([0.75, 0.4])
    probs = mixed_labels(y, y2, w, 3)
    assert torch.allclose(probs, torch.tensor([[0.75, 0.25, 0.0], [0.0, 0.0, 1.0]]))
    loss, _ = kd_loss(logits, None, probs, T=4.0, alpha=0.0)
    ce = torch.nn.functional.cross_entropy
    expected = (w * ce(logits, y, reduction="none") + (1 - w) * ce(logits, y2, reduction="none")).mean()
    assert torch.allclose(loss, expected)
    # class indices still work, and equal one-hot probabilities
    assert torch.allclose(kd_loss(logits, None, y, 4.0, 0.0)[0], kd_loss(logits, None, mixed_labels(y, y, w, 3), 4.0, 0.0)[0])


def test_top_k_keeps_the_largest_logits_and_the_tails_mass_at_t1():
    from kd_ray.core.losses import dense_from_top_k, top_k_logits

    z = torch.randn(6, 3, 50) * 4  # B, K, C
    kept = top_k_logits(z, 5)
    assert kept["values"].dtype == torch.float16 and kept["index"].dtype == torch.int16
    rebuilt = dense_from_top_k(kept["values"], kept["index"], kept["tail"], 50)
    p, q = torch.softmax(z, -1), torch.softmax(rebuilt, -1)
    idx = kept["index"].long()
    assert torch.allclose(q.gather(-1, idx), p.gather(-1, idx), rtol=5e-3, atol=1e-4)  # the kept classes
    tail = lambda x: 1 - x.gather(-1, idx).sum(-1)  # noqa: E731
    assert torch.allclose(tail(q), tail(p), atol=1e-3)  # the rest's total mass
    # every other class gets the same share of it
    rest = q.scatter(-1, idx, float("nan"))
    assert torch.allclose(rest.nan_to_num(0).amax(-1), rest.nan_to_num(1).amin(-1))
    with pytest.raises(ValueError, match="top_k must be in"):
        top_k_logits(z, 50)


def test_student_loss_reads_top_k_columns_as_logits():
    from kd_ray.core.losses import dense_from_top_k, resoften, top_k_logits
    from kd_ray.core.student_losses import make_loss
    from kd_ray.core.train import student_loss

    z, student = torch.randn(4, 3, 20), torch.randn(4, 20)
    kept = top_k_logits(z, 4)
    batch = {"image": student, "label": torch.arange(4), "soft_targets": resoften(z, 4.0)}
    batch.update({f"teacher_topk_{k}": v for k, v in kept.items()})
    got = student_loss(make_loss("kd"), 2.0, 1.0, 20, targets_T=4.0)(lambda x: x, batch)[0]
    want = kd_loss(student, resoften(dense_from_top_k(kept["values"], kept["index"], kept["tail"], 20), 2.0), None,
                   2.0, 1.0)[0]
    assert torch.allclose(got, want)

"""The student-loss registry: golden values of each loss, and what the trainer and config read
of its declaration (kd_ray/core/student_losses)."""
import math

import pytest
import torch
import torch.nn.functional as F

from kd_ray.core.config_files import load_config
from kd_ray.core.losses import ensemble_average, kd_loss, soften
from kd_ray.core.student_losses import LOSSES, Targets, make_loss
from kd_ray.core.student_losses.dkd import dkd_terms
from kd_ray.core.train import student_loss


def _kl(p, log_q):
    return (torch.xlogy(p, p) - p * log_q).sum(-1)


def test_the_registry_holds_each_loss_under_its_name_with_its_declaration():
    assert sorted(LOSSES) == ["dkd", "kd", "logit_matching", "per_teacher"]
    assert {n: c.reads for n, c in LOSSES.items()} == {"kd": "soft_targets", "dkd": "soft_targets",
                                                       "logit_matching": "teacher_logits", "per_teacher": "teacher_logits"}
    assert not LOSSES["logit_matching"].uses_temperature and LOSSES["dkd"].uses_temperature
    assert make_loss("dkd").params.model_dump() == {"tckd": 1.0, "nckd": 8.0}
    with pytest.raises(ValueError, match="unknown loss 'dkdd'; known losses"):
        make_loss("dkdd")


def test_kd_is_the_papers_soft_term():
    z, p = torch.randn(6, 5), torch.softmax(torch.randn(6, 5), -1)
    got = make_loss("kd")(z, Targets(3.0, torch.zeros(6, dtype=torch.long), soft_targets=p))
    assert set(got) == {"kl"} and torch.allclose(got["kl"], kd_loss(z, p, None, 3.0, 1.0)[0])


def test_dkd_golden_value_by_hand():
    # one row, 3 classes, target 0, T = 1: teacher p = (0.5, 0.3, 0.2), student logits 0 (q uniform)
    p, z, y = torch.tensor([[0.5, 0.3, 0.2]]), torch.zeros(1, 3), torch.tensor([0])
    tckd, nckd = dkd_terms(z, p, y, 1.0)
    # TCKD = KL((0.5, 0.5) || (1/3, 2/3)); NCKD = KL((0.6, 0.4) || (0.5, 0.5))
    want_t = 0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3))
    want_n = 0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5)
    assert tckd.item() == pytest.approx(want_t, abs=1e-6) and nckd.item() == pytest.approx(want_n, abs=1e-6)
    got = make_loss("dkd", {"tckd": 2.0, "nckd": 3.0})(z, Targets(1.0, y, soft_targets=p))
    assert got["tckd"].item() == pytest.approx(2 * want_t, abs=1e-6) and got["nckd"].item() == pytest.approx(3 * want_n, abs=1e-6)


def test_dkd_decomposes_kd_as_the_paper_says():
    # KL(p || q) = TCKD + (1 - p_t) * NCKD, row by row (Zhao et al. 2022, eq. 4)
    torch.manual_seed(0)
    v, z, y, T = torch.randn(8, 10) * 3, torch.randn(8, 10), torch.randint(0, 10, (8,)), 4.0
    p = soften(v, T)
    for i in range(8):
        tckd, nckd = dkd_terms(z[i:i + 1], p[i:i + 1], y[i:i + 1], T)
        kl = _kl(p[i:i + 1], F.log_softmax(z[i:i + 1] / T, -1))
        assert kl.item() == pytest.approx((tckd + (1 - p[i, y[i]]) * nckd).item(), rel=1e-5, abs=1e-6)


def test_dkd_matches_the_logit_masking_reference():
    # the usual construction from one teacher's logits: the target masked by subtracting 1000
    torch.manual_seed(1)
    v, z, y, T = torch.randn(16, 10) * 2, torch.randn(16, 10), torch.randint(0, 10, (16,)), 4.0
    mask = F.one_hot(y, 10).bool()
    p, q = soften(v, T), soften(z, T)
    b_t = torch.stack([p[mask], 1 - p[mask]], -1)
    b_s = torch.stack([q[mask], 1 - q[mask]], -1)
    tckd = _kl(b_t, b_s.log()).mean() * T * T
    nckd = _kl(torch.softmax(v / T - 1000.0 * mask, -1), F.log_softmax(z / T - 1000.0 * mask, -1)).mean() * T * T
    got = make_loss("dkd", {"tckd": 1.0, "nckd": 8.0})(z, Targets(T, y, soft_targets=p))
    assert torch.allclose(got["tckd"], tckd, atol=1e-5) and torch.allclose(got["nckd"], 8 * nckd, atol=1e-4)


def test_dkd_of_a_certain_teacher_has_no_non_target_term():
    p, y = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0])
    z = torch.randn(1, 3, requires_grad=True)
    out = make_loss("dkd")(z, Targets(2.0, y, soft_targets=p))
    assert out["nckd"].item() == 0.0 and torch.isfinite(sum(out.values()))
    sum(out.values()).backward()
    assert torch.isfinite(z.grad).all()


def test_per_teacher_kl_is_kd_plus_the_teachers_disagreement_with_the_same_gradient():
    torch.manual_seed(2)
    v, T = torch.randn(6, 3, 10) * 2, 3.0  # B, K, C
    z1 = torch.randn(6, 10, requires_grad=True)
    z2 = z1.detach().clone().requires_grad_(True)
    y = torch.zeros(6, dtype=torch.long)
    per = make_loss("per_teacher")(z1, Targets(T, y, teacher_logits=v))["kl"]
    pbar = ensemble_average(v.transpose(0, 1), T, "probs")
    kd = make_loss("kd")(z2, Targets(T, y, soft_targets=pbar))["kl"]
    p_k = soften(v, T)
    entropy = lambda p: -torch.xlogy(p, p).sum(-1)  # noqa: E731
    disagreement = (entropy(pbar) - entropy(p_k).mean(1)).mean() * T * T  # a generalised Jensen-Shannon divergence
    assert disagreement > 0.01
    assert per.item() == pytest.approx((kd + disagreement).item(), rel=1e-5)
    per.backward(), kd.backward()
    assert torch.allclose(z1.grad, z2.grad, atol=1e-6)  # the student cannot tell them apart (rule: probs)
    # against soft targets that average logits (rule: logits) the objectives differ
    z3 = z1.detach().clone().requires_grad_(True)
    make_loss("kd")(z3, Targets(T, y, soft_targets=ensemble_average(v.transpose(0, 1), T, "logits")))["kl"].backward()
    assert not torch.allclose(z1.grad, z3.grad, atol=1e-4)


def test_per_teacher_loss_has_a_hand_golden_value():
    # one teacher: per-teacher KD is KD; two identical teachers: still KD
    v, z, T = torch.tensor([[[2.0, 0.0, -1.0]]]), torch.tensor([[0.5, 0.5, 0.0]]), 2.0
    y = torch.tensor([0])
    p, log_q = soften(v[0], T), F.log_softmax(z / T, -1)
    want = (T * T) * _kl(p, log_q).mean()
    assert make_loss("per_teacher")(z, Targets(T, y, teacher_logits=v))["kl"].item() == pytest.approx(want.item(), rel=1e-6)
    assert make_loss("per_teacher")(z, Targets(T, y, teacher_logits=v.repeat(1, 2, 1)))["kl"].item() == pytest.approx(
        want.item(), rel=1e-6)


def test_the_trainer_hands_each_loss_what_it_reads_and_names_its_terms():
    torch.manual_seed(3)
    logits = torch.randn(5, 3, 10)  # B, K, C
    z, y = torch.randn(5, 10), torch.arange(5)
    batch = {"image": z, "label": y, "soft_targets": ensemble_average(logits.transpose(0, 1), 4.0),
             "teacher_logits": logits}
    loss, _, terms = student_loss(make_loss("dkd"), 4.0, 0.7, 10, targets_T=4.0)(lambda x: x, batch)
    assert set(terms) == {"tckd", "nckd", "hard"}
    assert torch.allclose(loss, 0.7 * (terms["tckd"] + terms["nckd"]) + 0.3 * F.cross_entropy(z, y))
    _, _, terms = student_loss(make_loss("per_teacher"), 4.0, 1.0, 10)(lambda x: x, batch)
    assert set(terms) == {"kl"}
    _, _, terms = student_loss(make_loss("kd"), 4.0, 0.0, 10)(lambda x: x, batch)  # a hard student
    assert set(terms) == {"hard"}


def test_the_engine_logs_each_term_per_epoch():
    from kd_ray.core.config import StudentConfig
    from kd_ray.core.models import build_model
    from kd_ray.core.train import Engine, shuffled_batches

    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,))
    rows = {"id": torch.arange(64), "image": x, "label": y, "soft_targets": torch.softmax(torch.randn(64, 3), -1)}
    s = StudentConfig(model_args={"hidden": [8]}, epochs=2, loss="dkd", loss_args={"nckd": 2.0})
    e = Engine(build_model("mlp", (1, 4, 4), 3, hidden=[8]), s, student_loss(make_loss(s.loss, s.loss_args), 4.0, 0.5, 3))
    e.fit(2, lambda ep: shuffled_batches(rows, 16, ep), lambda m: {"val_accuracy": 0.0})
    row = e.history[-1]
    assert {"train_tckd", "train_nckd", "train_hard"} <= set(row)
    assert row["train_loss"] == pytest.approx(0.5 * (row["train_tckd"] + row["train_nckd"]) + 0.5 * row["train_hard"], rel=1e-4)


def test_loss_parameters_are_checked_beside_the_loss_with_the_field_named():
    cfg = load_config(None, ["student.loss=dkd", "student.loss_args={nckd: 2}"])
    assert cfg.student.loss_args == {"nckd": 2}
    with pytest.raises(Exception, match=r"student\.loss_args\.beta: Extra inputs are not permitted \(loss dkd takes \['nckd', 'tckd'\]\)"):
        load_config(None, ["student.loss=dkd", "student.loss_args={beta: 2}"])
    with pytest.raises(Exception, match=r"student\.loss_args\.nckd: Input should be greater than or equal to 0"):
        load_config(None, ["student.loss=dkd", "student.loss_args={nckd: -1}"])
    with pytest.raises(Exception, match=r"student\.loss: unknown loss 'dk'"):
        load_config(None, ["student.loss=dk"])
    with pytest.raises(Exception, match=r"sweep\.losses"):
        load_config(None, ["sweep.losses=[kd, nope]"])
    with pytest.raises(Exception, match=r"per_teacher reads the teachers' logits.*teacher_logits is none"):
        load_config(None, ["sweep.losses=[kd, per_teacher]", "soft_targets.teacher_logits=none"])
    with pytest.raises(Exception, match=r"sweep\.loss_args\.nckd: no swept loss"):
        load_config(None, ["sweep.loss_args={nckd: [1, 8]}"])
    with pytest.raises(Exception, match=r"sweep\.loss_args\.nckd: Input should be greater than or equal to 0"):
        load_config(None, ["sweep.losses=[dkd]", "sweep.loss_args={nckd: [1, -8]}"])

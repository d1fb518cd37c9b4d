"""The training engine (kd_ray.core.train), without Ray: batches, evaluation, the epoch loop."""
import numpy as np
import pytest
import torch

from kd_ray.core.train import EpochStream, bias_adjustment, shuffled_batches


def test_in_memory_epochs_visit_every_row_once_in_a_seeded_order():
    rows = {"id": torch.arange(10, 20), "image": torch.randn(10, 3)}
    epoch = list(shuffled_batches(rows, 4, seed=7))
    assert [len(b["id"]) for b in epoch] == [4, 4, 2]
    ids = torch.cat([b["id"] for b in epoch])
    assert sorted(ids.tolist()) == list(range(10, 20))
    for b in epoch:  # columns stay aligned
        assert torch.equal(b["image"], rows["image"][b["id"] - 10])
    again = torch.cat([b["id"] for b in shuffled_batches(rows, 4, seed=7)])
    other = torch.cat([b["id"] for b in shuffled_batches(rows, 4, seed=8)])
    assert torch.equal(ids, again) and not torch.equal(ids, other)


def test_epoch_stream_cuts_one_ordered_stream_into_epochs_of_batches():
    # 2 epochs x 5 rows, blocks of 3 that straddle the epoch boundary
    epoch = np.repeat([0, 1], 5)
    ids = np.tile(np.arange(5), 2)
    blocks = [{"epoch": epoch[i:i + 3], "id": ids[i:i + 3]} for i in range(0, 10, 3)]
    stream = EpochStream(iter(blocks), batch_size=2)
    first = list(stream.epoch(0))
    assert [b["id"].tolist() for b in first] == [[0, 1], [2, 3], [4]]  # an epoch's last batch may be short
    assert all(isinstance(b["id"], torch.Tensor) for b in first)
    second = list(stream.epoch(1))
    assert [b["id"].tolist() for b in second] == [[0, 1], [2, 3], [4]]
    assert list(stream.epoch(2)) == []
    # an epoch that is left early (early stopping) does not leak its rows into the next
    stream = EpochStream(iter(blocks), batch_size=2)
    next(iter(stream.epoch(0)))
    assert [b["id"].tolist() for b in stream.epoch(1)] == [[0, 1], [2, 3], [4]]


def test_bias_adjustment_picks_the_delta_that_fixes_the_class():
    # class 2 is never predicted: its logit sits 3 below the winner on its own samples, and
    # 4 below on the others' -> any delta in (3, 4) is perfect; the smallest on the grid is 3.25
    z = torch.tensor([[5.0, 0.0, 2.0], [0.0, 5.0, 2.0], [6.0, 0.0, 2.0], [0.0, 6.0, 2.0]])
    y = torch.tensor([2, 2, 0, 1])
    delta = bias_adjustment(z, y, [2])
    assert delta == 3.25
    z2 = z.clone()
    z2[:, 2] += delta
    assert (z2.argmax(1) == y).float().mean() == 1.0




# ---------------------------------------------------------------------------- the engine
def _toy(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = (x.flatten(1).sum(1) > 0).long()
    return x, y


def _engine(spec, patience=None, lr=None):
    from kd_ray.core.models import build_model
    from kd_ray.core.train import Engine, cross_entropy_loss

    torch.manual_seed(0)
    model = build_model("mlp", (1, 4, 4), 2, hidden=[16])
    return Engine(model, spec if lr is None else spec.model_copy(update={"lr": lr}), cross_entropy_loss,
                  keep_best=patience is not None)


def _fit(engine, epochs, x, y, patience=None, report_every=1, reports=None):
    def batches(epoch):
        for b in shuffled_batches({"id": torch.arange(len(x)), "image": x, "label": y}, 32, epoch):
            yield b

    def validate(m):
        with torch.no_grad():
            return {"val_accuracy": float((m(x).argmax(1) == y).float().mean())}

    on_report = reports.append if reports is not None else (lambda row: None)
    return engine.fit(epochs, batches, validate, on_report, report_every, patience)


def test_engine_resumes_bit_for_bit_from_its_state():
    from kd_ray.core.config import StudentConfig

    x, y = _toy()
    spec = StudentConfig(epochs=6, lr=0.1)
    whole = _engine(spec)
    _fit(whole, 6, x, y)
    first = _engine(spec)
    _fit(first, 3, x, y)
    resumed = _engine(spec)
    resumed.load_state_dict(first.state_dict())
    _fit(resumed, 6, x, y)
    assert resumed.resumed_from == 3 and resumed.epoch == 6
    for a, b in zip(whole.plain.state_dict().values(), resumed.plain.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["train_loss"] for r in whole.history] == [r["train_loss"] for r in resumed.history]


def test_engine_reports_every_n_epochs_and_stops_early_on_validation():
    from kd_ray.core.config import StudentConfig

    x, y = _toy()
    reports = []
    e = _engine(StudentConfig(epochs=7), patience=2, lr=1e-9)  # learns nothing: validation never improves
    stopped = _fit(e, 7, x, y, patience=2, reports=reports)
    assert stopped and [r["epoch"] for r in reports] == [1, 2, 3]  # best at 1, two reports without progress
    assert e.best.epoch == 1 and e.best.state is not None
    reports = []
    e = _engine(StudentConfig(epochs=7))
    assert not _fit(e, 7, x, y, report_every=3, reports=reports)
    assert [r["epoch"] for r in reports] == [3, 6, 7]  # and after the last epoch
    assert {"train_loss", "train_accuracy", "train_rows", "val_accuracy", "seconds"} <= set(reports[0])


def test_engine_raises_diverged_with_the_epoch():
    from kd_ray.core.config import StudentConfig
    from kd_ray.core.train import Diverged

    x, y = _toy()
    e = _engine(StudentConfig(epochs=3, lr=1e6, grad_clip_norm=None))
    with pytest.raises(Diverged) as info:
        _fit(e, 3, x, y)
    assert info.value.epoch >= 1 and not np.isfinite(info.value.loss)


def test_gradient_clipping_bounds_every_step():
    from kd_ray.core.config import StudentConfig

    x, y = _toy()
    e = _engine(StudentConfig(epochs=1, lr=0.1, grad_clip_norm=0.01, momentum=0.0))
    before = [p.detach().clone() for p in e.plain.parameters()]
    _fit(e, 1, x, y)  # 3 steps of plain SGD: each moves the weights by at most lr * 0.01
    with torch.no_grad():
        moved = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(e.plain.parameters(), before)))
    assert float(moved) <= 3 * 0.1 * 0.01 + 1e-6


def test_max_norm_holds_after_every_step_of_training():
    """The engine projects a constrained model after each optimiser step: with a bound that binds
    (a large lr), no hidden unit ends an epoch above it, while the same run unconstrained does."""
    from kd_ray.core.config import StudentConfig
    from kd_ray.core.models import build_model
    from kd_ray.core.train import Engine, cross_entropy_loss

    x, y = _toy()
    norms = {}
    for bound in (None, 0.6):
        torch.manual_seed(0)
        model = build_model("mlp", (1, 4, 4), 2, hidden=[16], **({"max_norm": bound} if bound else {}))
        e = Engine(model, StudentConfig(epochs=3, lr=2.0, grad_clip_norm=None), cross_entropy_loss)
        _fit(e, 3, x, y)
        norms[bound] = float(e.plain[1].weight.norm(dim=1).max())
    assert norms[0.6] <= 0.6 + 1e-6 < norms[None]


def _confident_teacher(n=6000, seed=0):
    """28 x 28 inputs standardised as kd_ray does (values beyond 3) and a teacher whose top-1
    probability is >= 0.999 on every row at T = 1, as a well-trained MNIST teacher is."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(10, 784, generator=g) < 0.2).float()
    y = torch.randint(0, 10, (n,), generator=g)
    x = (protos[y] * torch.rand(n, 784, generator=g) + 0.3 * torch.rand(n, 784, generator=g)).clamp(0, 1)
    x = (x - x.mean()) / x.std()
    z = 30.0 * (x @ protos.T) / protos.sum(1) + 4 * torch.randn(n, 10, generator=g)
    return x.view(n, 1, 28, 28), y, z


@pytest.mark.parametrize("clip", ["shipped", None])
def test_paper_setting_trains_at_T20_with_the_shipped_student(clip):
    """The paper's setting (mnist_paper: T = 20, alpha 0.9, lr 0.05, SGD with momentum) stays finite
    with the shipped student.grad_clip_norm; without clipping the same run diverges."""
    from kd_ray.core.config_files import load_config
    from kd_ray.core.losses import kd_loss, soften
    from kd_ray.core.models import build_model
    from kd_ray.core.plan import plan_student
    from kd_ray.core.train import Diverged, Engine

    x, y, z = _confident_teacher()
    assert float((torch.softmax(z, 1).max(1).values >= 0.999).float().mean()) > 0.5 and float(x.max()) > 2.8
    cfg = load_config("mnist_paper")
    T, s = plan_student(cfg).temperature, cfg.student.model_copy(update={"epochs": 2})
    assert T == 20 and s.lr == 0.05
    if clip is None:
        s = s.model_copy(update={"grad_clip_norm": None})
    soft = soften(z, T)
    torch.manual_seed(0)

    def loss_fn(m, b):
        logits = m(b["image"])
        return kd_loss(logits, b["soft_targets"], b["label"], T, s.alpha)[0], logits, {}

    engine = Engine(build_model(s.model, (1, 28, 28), 10, **s.model_args), s, loss_fn)

    def batches(epoch):
        rows = {"id": torch.arange(len(x)), "image": x, "label": y, "soft_targets": soft}
        return shuffled_batches(rows, s.batch_size, epoch)

    if clip is None:
        with pytest.raises(Diverged):
            engine.fit(2, batches, lambda m: {"val_accuracy": 0.0})
        return
    engine.fit(2, batches, lambda m: {"val_accuracy": 0.0})
    losses = [r["train_loss"] for r in engine.history]
    assert all(np.isfinite(losses)) and losses[1] < losses[0]


def test_bf16_autocast_trains_on_the_cpu():
    """runtime.mixed_precision: the engine's forward pass under bf16 autocast, float32 weights."""
    from kd_ray.core.config import StudentConfig
    from kd_ray.core.train import amp_dtype

    assert amp_dtype("auto", torch.device("cpu")) is None and amp_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert amp_dtype("bf16", torch.device("cpu")) == torch.bfloat16 and amp_dtype("off", torch.device("cuda")) is None
    x, y = _toy(256)
    seen = []

    def loss_fn(m, b):
        from kd_ray.core.train import cross_entropy_loss

        loss, logits, terms = cross_entropy_loss(m, b)
        seen.append(logits.dtype)
        return loss, logits, terms

    from kd_ray.core.models import build_model
    from kd_ray.core.train import Engine

    torch.manual_seed(0)
    e = Engine(build_model("mlp", (1, 4, 4), 2, hidden=[16]), StudentConfig(epochs=4, lr=0.1), loss_fn,
               amp=torch.bfloat16)
    _fit(e, 4, x, y)
    assert set(seen) == {torch.bfloat16}  # the forward pass ran in bfloat16
    assert all(p.dtype == torch.float32 for p in e.plain.parameters())  # the weights stay float32
    losses = [r["train_loss"] for r in e.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_student_loss_resoftens_stored_logits_at_another_temperature():
    from kd_ray.core.losses import ensemble_average, kd_loss
    from kd_ray.core.student_losses import make_loss
    from kd_ray.core.train import student_loss

    logits = torch.randn(3, 5, 10)  # K, B, C
    z = torch.randn(5, 10)
    batch = {"image": z, "label": torch.arange(5), "soft_targets": ensemble_average(logits, 4.0),
             "teacher_logits": logits.transpose(0, 1).half()}
    kd = make_loss("kd")
    same = student_loss(kd, 4.0, 1.0, 10, targets_T=4.0)(lambda x: x, batch)[0]
    assert torch.equal(same, kd_loss(z, batch["soft_targets"], None, 4.0, 1.0)[0])  # the stored column
    other = student_loss(kd, 2.0, 1.0, 10, targets_T=4.0)(lambda x: x, batch)[0]
    assert torch.allclose(other, kd_loss(z, ensemble_average(logits, 2.0), None, 2.0, 1.0)[0], atol=2e-3)
    del batch["teacher_logits"]
    with pytest.raises(ValueError, match="soft_targets.teacher_logits"):
        student_loss(kd, 2.0, 1.0, 10, targets_T=4.0)(lambda x: x, batch)


def test_student_loss_matches_the_teachers_mean_logit_with_logit_matching():
    import torch.nn.functional as F

    from kd_ray.core.losses import logit_matching_loss
    from kd_ray.core.student_losses import make_loss
    from kd_ray.core.train import student_loss

    logits = torch.randn(5, 3, 10)  # B, K, C
    z = torch.randn(5, 10)
    batch = {"image": z, "label": torch.arange(5), "teacher_logits": logits.half()}
    loss = student_loss(make_loss("logit_matching"), 4.0, 0.7, 10)(lambda x: x, batch)[0]
    want = 0.7 * logit_matching_loss(z, logits.half().float().mean(1)) + 0.3 * F.cross_entropy(z, torch.arange(5))
    assert torch.allclose(loss, want)
    del batch["teacher_logits"]
    with pytest.raises(ValueError, match="student.loss=logit_matching reads the teachers' logits"):
        student_loss(make_loss("logit_matching"), 4.0, 0.7, 10)(lambda x: x, batch)


def test_buffered_batches_cover_the_stream_once_in_a_seeded_shuffled_order():
    """A streamed epoch (teachers on a streamed source): every row once, full batches but the
    last, shuffled across blocks within the buffer, the same order for the same seed."""
    from kd_ray.core.train import buffered_batches

    blocks = [{"id": np.arange(i, i + 7), "x": np.arange(i, i + 7) * 2.0} for i in range(0, 70, 7)]
    got = list(buffered_batches(iter(blocks), 8, 20, seed=1))
    ids = np.concatenate([b["id"] for b in got])
    assert sorted(ids) == list(range(70)) and [len(b["id"]) for b in got][:-1] == [8] * 8
    assert all(np.array_equal(b["x"], b["id"] * 2.0) for b in got)  # columns stay aligned
    assert not np.array_equal(ids, np.arange(70)) and ids[:8].max() >= 7  # mixed across blocks
    again = np.concatenate([b["id"] for b in buffered_batches(iter(blocks), 8, 20, seed=1)])
    other = np.concatenate([b["id"] for b in buffered_batches(iter(blocks), 8, 20, seed=2)])
    assert np.array_equal(ids, again) and not np.array_equal(ids, other)
    assert list(buffered_batches(iter([]), 8, 20, seed=1)) == []


def test_bias_adjustment_lowers_the_only_classes_a_student_saw():
    # classes 0 and 1 win everywhere by 2 (their own samples by 5): lowering both by 2.25 fixes class 2
    z = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    y = torch.tensor([0, 1, 2, 2])
    assert bias_adjustment(z, y, [0, 1]) == -2.25

"""The teaching modes' declarations (kd_ray/core/teaching.py): what each one says, and that the
sweep's grid and resources read them."""
from kd_ray.core.config_files import load_config
from kd_ray.core.teaching import TEACHINGS, default_teaching, teaching


def test_each_mode_declares_its_views_cache_split_passes_and_baseline():
    got = {n: (t.view, t.split, t.teacher_passes, t.matched_baseline) for n, t in TEACHINGS.items()}
    assert got == {"cached": ("stored", "train", False, False), "inconsistent": ("shift", "train", False, True),
                   "consistent": ("stream", "none", True, True), "cached_views": ("cached_view", "views", False, True)}
    assert all(t.doc for t in TEACHINGS.values())
    st = load_config(None, ["soft_targets.jitter=1"]).soft_targets
    streams = {n: t.streamed_source(st) is None for n, t in TEACHINGS.items()}
    assert streams == {"cached": True, "inconsistent": True, "consistent": True, "cached_views": True}
    mixed = st.model_copy(update={"mixup": 1.0})  # a mixed view's partner: any row of the subset, held in memory
    assert "mixup" in TEACHINGS["consistent"].streamed_source(mixed) and TEACHINGS["cached_views"].streamed_source(mixed)


def test_what_each_mode_needs_of_the_soft_targets():
    st = load_config(None, []).soft_targets
    assert TEACHINGS["cached"].needs(st) is None
    assert "soft_targets.jitter" in TEACHINGS["inconsistent"].needs(st)
    assert "soft_targets.jitter" in TEACHINGS["consistent"].needs(st)
    assert "soft_targets.views" in TEACHINGS["cached_views"].needs(st)
    mixed = st.model_copy(update={"mixup": 1.0})
    assert TEACHINGS["consistent"].needs(mixed) is None and TEACHINGS["inconsistent"].needs(mixed)
    assert TEACHINGS["cached_views"].needs(mixed.model_copy(update={"views": 4})) is None


def test_a_hard_baseline_trains_on_its_modes_views():
    st = load_config(None, ["soft_targets.jitter=1"]).soft_targets
    assert TEACHINGS["consistent"].hard_mode(st).name == "inconsistent"  # shifts need no teacher
    assert TEACHINGS["consistent"].hard_mode(st.model_copy(update={"mixup": 1.0})).name == "consistent"  # mixed labels
    assert TEACHINGS["cached_views"].hard_mode(st).name == "cached_views"
    assert default_teaching(st) == "consistent" and default_teaching(st.model_copy(update={"views": 4})) == "cached"
    assert teaching("cached") is TEACHINGS["cached"]

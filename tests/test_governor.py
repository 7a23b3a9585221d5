"""The governor picks the measured-fastest arm and keeps probing the others."""

from vllm_clasp.governor import LOOKUP, PLAIN, SKIP, Governor, batch_bucket


def simulate(rates, steps=400, num_seqs=1, gov=None):
    """Each step takes 1 s and commits rates[arm] tokens for the arm the governor chose."""
    g = gov or Governor()
    t, arm, arms = 0.0, None, []
    for _ in range(steps):
        if arm is not None:
            t += 1.0
            g.observe(rates[arm], measurable=True, now=t)
        arm = g.decide(num_seqs)
        arms.append(arm)
        g.finish(arm, num_seqs, 0.0, now=t)
    return arms


def share(arms, arm):
    return sum(a == arm for a in arms) / len(arms)


def test_prefers_plain_when_drafting_is_slower():
    arms = simulate({SKIP: 0.8, LOOKUP: 0.9, PLAIN: 1.0})[100:]
    assert share(arms, PLAIN) > 0.8
    assert share(arms, SKIP) > 0 and share(arms, LOOKUP) > 0, "keeps probing"


def test_prefers_layer_skip_when_it_pays():
    arms = simulate({SKIP: 1.6, LOOKUP: 1.1, PLAIN: 1.0})[100:]
    assert share(arms, SKIP) > 0.8 and share(arms, PLAIN) > 0


def test_prefers_lookup_when_only_it_pays():
    assert share(simulate({SKIP: 0.9, LOOKUP: 1.2, PLAIN: 1.0})[100:], LOOKUP) > 0.8


def test_follows_a_change_in_workload():
    g = Governor()
    simulate({SKIP: 0.7, LOOKUP: 0.9, PLAIN: 1.0}, gov=g, steps=200)
    arms = simulate({SKIP: 2.0, LOOKUP: 0.9, PLAIN: 1.0}, gov=g, steps=400)
    assert share(arms[-100:], SKIP) > 0.8


def test_disabled_always_uses_the_first_arm_and_buckets():
    assert set(simulate({SKIP: 0.1, LOOKUP: 1, PLAIN: 1.0}, gov=Governor(enabled=False), steps=50)) == {SKIP}
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]


def test_unmeasurable_and_idle_steps_are_ignored():
    g = Governor()
    g.finish(SKIP, 1, 0.0, now=0.0)
    g.observe(5, measurable=False, now=1.0)
    g.observe(5, measurable=True, now=100.0)  # idle gap
    assert g.rate(1, SKIP).steps == 0

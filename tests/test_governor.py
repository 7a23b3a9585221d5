"""The governor's cost model: it picks the arm that is fastest under measured costs, carries what
it learned across batch sizes, and keeps probing arms that come within reach."""

from vllm_clasp.governor import LOOKUP, PLAIN, SKIP, Governor, StepCost


class Engine:
    """Synthetic engine: a step over T tokens takes a + b·T seconds; per arm, each sequence
    commits tau tokens and drafts d per round, and drafting costs kappa plain steps."""

    def __init__(self, a=0.05, b=0.008, arms=None):
        self.a, self.b = a, b
        self.arms = arms or {}
        self.t = 0.0

    def run(self, gov, num_seqs, steps):
        chosen, last = [], None
        for _ in range(steps):
            if last is not None:
                tau, d, kappa = self.arms.get(last, (1.0, 0.0, 0.0))
                self.t += self.a + self.b * num_seqs * (1 + d)
                gov.observe(num_seqs * tau, True, now=self.t,
                            scheduled=num_seqs * (1 + d), rows=num_seqs)
            last = gov.decide(num_seqs)
            chosen.append(last)
            draft_s = self.arms.get(last, (1, 0, 0.0))[2] * (self.a + self.b * num_seqs)
            self.t += draft_s
            gov.finish(last, num_seqs, draft_s, now=self.t)
        return chosen


def share(arms, arm):
    return sum(a == arm for a in arms) / len(arms)


# Per arm: (tau, drafts per round, drafting cost in plain steps)
GOOD_SKIP = {SKIP: (2.4, 2.5, 0.9), LOOKUP: (1.1, 0.5, 0.02)}


def test_layer_skip_at_batch_1_plain_at_batch_16_from_the_same_figures():
    g = Governor()
    e = Engine(arms=GOOD_SKIP)
    at1 = e.run(g, 1, 150)[30:]
    assert share(at1, SKIP) > 0.85
    at16 = e.run(g, 16, 150)
    # Nothing re-learned at the new batch size: plain from the first step the model is trusted.
    assert share(at16[:10], SKIP) == 0
    assert share(at16[10:], PLAIN) > 0.9


def test_prefers_plain_when_drafting_is_slower():
    g = Governor()
    arms = Engine(arms={SKIP: (1.3, 2.0, 1.2), LOOKUP: (1.02, 0.4, 0.02)}).run(g, 1, 300)[30:]
    assert share(arms, PLAIN) > 0.9


def test_prefers_lookup_when_only_it_pays():
    g = Governor()
    arms = Engine(arms={SKIP: (1.5, 3.0, 1.5), LOOKUP: (1.8, 1.0, 0.02)}).run(g, 4, 300)[30:]
    assert share(arms, LOOKUP) > 0.85


def test_follows_a_change_in_workload_by_probing():
    g = Governor()
    Engine(arms={SKIP: (1.3, 2.0, 0.9), LOOKUP: (1.05, 0.3, 0.02)}).run(g, 1, 200)
    arms = Engine(arms={SKIP: (3.5, 3.0, 0.9), LOOKUP: (1.05, 0.3, 0.02)}).run(g, 1, 600)
    assert share(arms[-100:], SKIP) > 0.8


def test_disabled_always_uses_the_first_arm():
    g = Governor(enabled=False)
    assert set(Engine(arms=GOOD_SKIP).run(g, 16, 50)) == {SKIP}


def test_unmeasurable_and_idle_steps_are_ignored():
    g = Governor()
    g.finish(SKIP, 1, 0.0, now=0.0)
    g.observe(5, measurable=False, now=1.0)
    g.observe(5, measurable=True, now=100.0)  # idle gap
    assert g.arm(SKIP).steps == 0 and not g.verify.known


def test_step_cost_fit_recovers_slope_and_keeps_prior_shape_on_one_size():
    c = StepCost()
    for t in (1, 5, 16, 40, 80) * 5:
        c.add(t, 0.05 + 0.008 * t)
    a, b = c.coef()
    assert abs(a - 0.05) < 1e-6 and abs(b - 0.008) < 1e-6
    one = StepCost()
    for _ in range(5):
        one.add(1, 0.06)
    assert abs(one(1) - 0.06) < 1e-9 and one(10) > one(1)


def test_exploration_moves_on_when_steps_are_never_measurable():
    """Under constant arrivals every step holds a prefill: the governor must not stay on its first
    exploration arm (plain, at larger batches) for ever."""
    g = Governor()
    chosen = []
    for t in range(60):
        g.observe(8, measurable=False, now=float(t))
        a = g.decide(8)
        chosen.append(a)
        g.finish(a, 8, 0.0, now=float(t))
    assert {LOOKUP, SKIP} <= set(chosen[12:])

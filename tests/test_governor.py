"""The governor's cost model: layer-skip drafts only while they pay (measured on the rows that get
them, carried across batch sizes), re-measured now and then, and a price per verified token that
follows the step cost."""

from vllm_clasp.governor import Governor, StepCost


class Engine:
    """Synthetic engine: a step over T tokens takes a + b·T seconds. Rows without a context draft
    get layer-skip drafts when the governor says so: ``d`` tokens each, ``acc`` of them accepted,
    drafting costs ``kappa`` plain steps per step."""

    def __init__(self, a=0.05, b=0.008, d=3.0, acc=2.0, kappa=0.5):
        self.a, self.b, self.d, self.acc, self.kappa = a, b, d, acc, kappa
        self.t = 0.0

    def run(self, gov, rows, steps):
        chosen, last = [], None
        for _ in range(steps):
            if last is not None:
                d = self.d if last else 0.0
                self.t += self.a + self.b * rows * (1 + d)
                gov.observe(rows * (1 + (self.acc if last else 0)), True, now=self.t,
                            scheduled=rows * (1 + d), rows=rows)
                if last:
                    gov.observe_skip(rows, rows * self.d, rows * self.acc)
            last = gov.use_skip(rows)
            chosen.append(last)
            skip_s = self.kappa * (self.a + self.b * rows) if last else 0.0
            self.t += skip_s
            gov.finish(2 if last else 0, skip_s, skip_s, now=self.t)
        return chosen


def share(xs):
    return sum(xs) / len(xs)


def test_layer_skip_at_batch_1_off_at_batch_16_from_the_same_figures():
    g = Governor()
    e = Engine()
    assert share(e.run(g, 1, 200)[20:]) > 0.95
    at16 = e.run(g, 16, 400)
    # Nothing re-learned at the new batch size: off from the first steps, then rare probes.
    assert share(at16[:10]) == 0
    assert share(at16[100:]) < 0.05


def test_off_when_drafting_costs_more_than_it_brings():
    g = Governor()
    chosen = Engine(d=2.0, acc=0.3, kappa=1.2).run(g, 1, 600)
    assert share(chosen[50:]) < 0.05


def test_follows_a_change_in_workload_by_probing():
    g = Governor()
    Engine(acc=0.2).run(g, 1, 300)
    chosen = Engine(acc=2.5).run(g, 1, 800)
    assert share(chosen[-100:]) > 0.9


def test_probes_back_off_while_layer_skip_keeps_losing():
    g = Governor()
    chosen = Engine(acc=0.1, kappa=1.0).run(g, 1, 3000)
    early, late = share(chosen[20:520]), share(chosen[-1000:])
    assert 0 < late < early


def test_disabled_always_drafts_and_prices_nothing():
    g = Governor(enabled=False)
    assert set(Engine(acc=0.0).run(g, 16, 50)) == {True}
    assert g.token_price(16) == 0.0


def test_unmeasurable_and_idle_steps_are_ignored():
    g = Governor()
    g.finish(2, 0.0, 0.0, now=0.0)
    g.observe(5, measurable=False, now=1.0, rows=1)
    g.observe(5, measurable=True, now=100.0, rows=1)  # idle gap
    assert not g.verify.known and g.recent.w == 0


def test_token_price_follows_the_marginal_step_cost():
    flat, steep = Governor(), Governor()
    for i in range(200):
        t = 1 + i % 6
        flat.verify.add(t, 0.033)  # batch size 1 on this CPU: every size costs the same
        steep.verify.add(8 * t, 0.026 + 0.0015 * 8 * t)
    assert abs(flat.token_price(1)) < 1e-9
    assert 0.1 < steep.token_price(8) < 1.0 and steep.token_price(16) > steep.token_price(8)


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
    """Under constant arrivals every step holds a prefill: layer-skip must not stay on for ever
    waiting to be measured."""
    g = Governor()
    chosen = []
    for t in range(300):
        g.observe(8, measurable=False, now=float(t), rows=8)
        s = g.use_skip(8)
        chosen.append(s)
        g.finish(2 if s else 0, 0.0, 0.0, now=float(t))
    assert share(chosen[100:]) < 0.2


def test_price_uses_the_slope_at_this_batch_size():
    """Flat at one sequence, steep at eight: one global line would average the two slopes."""
    g = Governor()
    for i in range(300):
        t = 1 + i % 6
        g.verify.add(t, 0.034)
        g.by_rows.setdefault(1, StepCost()).add(t, 0.034)
        g.verify.add(8 * t, 0.026 + 0.0015 * 8 * t)
        g.by_rows.setdefault(8, StepCost()).add(8 * t, 0.026 + 0.0015 * 8 * t)
    assert abs(g.token_price(1)) < 1e-9
    assert abs(g.step_cost(8).coef()[1] - 0.0015) < 1e-6
    assert g.step_cost(16) is g.verify  # nothing measured there yet

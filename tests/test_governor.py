"""The governor's cost model: layer-skip drafts only while they pay (measured on the rows that get
them, carried across batch sizes), re-measured now and then, and a price per verified token that
follows the step cost."""

import numpy as np

from vllm_clasp.governor import Governor, StepCost, best_draft_lengths


class Engine:
    """Synthetic engine: a step over T tokens takes a + b·T seconds. Rows without a context draft
    get layer-skip drafts when the governor says so: ``d`` tokens each, ``acc`` of them accepted,
    drafting costs ``kappa`` plain steps per step."""

    def __init__(self, a=0.05, b=0.008, d=3.0, acc=2.0, kappa=0.5):
        self.a, self.b, self.d, self.acc, self.kappa = a, b, d, acc, kappa
        self.t = 0.0

    def run(self, gov, rows, steps, until=None):
        """``until(gov)`` true after a step ends the run there."""
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
            if until is not None and until(gov):
                break
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


def test_probes_back_off_and_stay_within_their_time_budget_while_layer_skip_keeps_losing():
    g = Governor(probe_budget=0.01)  # twice the default: room for late probes to be seen
    chosen = Engine(acc=0.1, kappa=1.0).run(g, 1, 3000)
    early, late = share(chosen[20:520]), share(chosen[-1000:])
    assert 0 < late <= early
    assert g._probe_s <= 1.5 * g.probe_budget * g._busy_s


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


def test_a_pause_under_five_seconds_is_not_a_step():
    """Recorded in a bench at batch 8: the engine idled 4.7 s between two batches and the next
    step had one sampled row; that gap, taken for a one-row step, made a token at one row worth
    nothing, and layer-skip drafts 'paid' there."""
    g, t = Governor(), 0.0
    for _ in range(64):
        g.finish(0, 0.0, 0.0, now=t)
        t += 0.05
        g.observe(8, True, now=t, scheduled=8, rows=8)
    busy, rate1 = g._busy_s, g.rate(1)
    g.finish(0, 0.0, 0.0, now=t)
    g.observe(1, True, now=t + 4.7, scheduled=1, rows=1)
    assert g._busy_s == busy and 1 not in g.by_rows and g.rate(1) == rate1
    g.finish(0, 0.0, 0.0, now=t + 4.7)
    g.observe(1, True, now=t + 4.75, scheduled=1, rows=1)  # decoding again: measured
    assert g._busy_s > busy and 1 in g.by_rows


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
    a, b, knee = c.coef()
    assert abs(a - 0.05) < 1e-6 and abs(b - 0.008) < 1e-6 and knee == 0
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
    assert g.step_cost(16).cost is g.verify  # nothing measured there yet


def test_step_cost_finds_the_knee_where_tokens_start_to_cost():
    """This CPU at batch 8: ~42 ms up to ~12 verified tokens, then ~1.9 ms per token (measured)."""
    rng = np.random.default_rng(0)
    c = StepCost()
    for _ in range(400):
        t = int(rng.integers(8, 30))
        c.add(t, (0.042 + 0.0019 * max(0, t - 12)) * (1 + 0.03 * rng.standard_normal()))
    a, b, knee = c.coef()
    assert 10 <= knee <= 16 and abs(b - 0.0019) < 0.0004 and abs(a - 0.042) < 0.003
    assert c.marginal(9) == 0.0 and c.marginal(20) == b
    assert c.kappa == 0.0 and c.context == 0.0  # steps given without attention work: no such term


def test_step_cost_noise_alone_shows_no_slope():
    rng = np.random.default_rng(1)
    c = StepCost()
    for _ in range(300):
        c.add(int(rng.integers(1, 8)), 0.033 * (1 + 0.05 * rng.standard_normal()))
    # free over the sizes seen (1..7) and a quarter past them; beyond, the prior slope until seen
    assert c.marginal(4) == 0.0 and c.marginal(8) == 0.0 and c.coef()[2] == 9 and c.marginal(9) > 0


def _linear(a, b):
    c = StepCost()
    for t in (16, 20, 24, 32, 48) * 20:
        c.add(t, a + b * t)
    return c


def test_best_draft_lengths_take_the_surest_tokens_first_and_stop_where_they_cost_more():
    # batch 16 on this CPU: 53 ms per step, 2.2 ms per verified token -> a token pays above ~0.66
    cost = _linear(0.053 - 0.0022 * 16, 0.0022)
    sure, fair, poor = np.cumprod([0.95] * 6), np.cumprod([0.6] * 6), np.cumprod([0.3] * 6)
    got = best_draft_lengths([sure, fair, poor] + [np.zeros(0)] * 13, 16, 16, cost)
    assert got[:3] == [6, 0, 0]
    # free verification (batch 1, few tokens): everything is worth trying, up to the sizes seen
    flat = StepCost()
    for t in (1, 2, 3, 4, 5, 6) * 20:
        flat.add(t, 0.033)
    assert best_draft_lengths([sure, poor], 2, 2, flat) == [6, 0]  # 8 tokens: free up to 1.25 * 6
    wide = StepCost()
    for t in list(range(1, 15)) * 10:
        wide.add(t, 0.033)
    assert best_draft_lengths([sure, poor], 2, 2, wide) == [6, 6]
    # nothing to draft: nothing chosen
    assert best_draft_lengths([np.zeros(0)], 1, 1, cost) == [0]


def test_best_draft_lengths_are_the_best_of_every_choice():
    """Brute force over every combination of prefix lengths on small cases."""
    import itertools

    rng = np.random.default_rng(2)
    for _ in range(30):
        cost = _linear(rng.uniform(0.01, 0.05), rng.uniform(0.0, 0.01))
        drafts = [np.cumprod(rng.uniform(0.1, 1.0, size=rng.integers(0, 4))) for _ in range(3)]
        base = int(rng.integers(3, 8))
        got = best_draft_lengths(drafts, base, base, cost)

        def rate(ls):
            return (base + sum(d[:m].sum() for d, m in zip(drafts, ls))) / cost(base + sum(ls))

        best = max(rate(ls) for ls in itertools.product(*[range(d.size + 1) for d in drafts]))
        assert rate(got) >= best - 1e-12


def test_step_cost_tells_the_once_per_step_cost_of_drafting_from_the_per_token_cost():
    """Batch 16 here: a step with any draft pays ~1 ms once (rejection sampler), then ~2 ms per token."""
    rng = np.random.default_rng(3)
    c = StepCost()
    for _ in range(400):
        t = int(rng.integers(17, 40)) if rng.random() < 0.7 else 16
        c.add(t, (0.053 + 0.0012 * (t > 16) + 0.0021 * (t - 16)) * (1 + 0.02 * rng.standard_normal()), t > 16)
    assert abs(c.draft_step_extra - 0.0012) < 0.0006 and abs(c.coef()[1] - 0.0021) < 0.0003
    # a lone draft token must now beat the once-per-step cost as well as its own
    one = best_draft_lengths([np.array([0.6])] + [np.zeros(0)] * 15, 16, 16, c)
    assert one[0] == 0


def test_critical_rows_only_when_no_request_waits():
    from vllm_clasp.governor import critical_rows

    assert critical_rows([60, 63, 10], waiting=3) is None  # a queue: throughput counts
    assert critical_rows([60, 63, 10], waiting=None) is None  # unknown: the same
    assert critical_rows([63], waiting=0) is None  # one sequence: it is the batch
    assert critical_rows([60, 63, 10, 62], waiting=0) == [False, True, False, True]


def test_the_last_sequence_to_end_is_likeliest_the_one_with_most_tokens_left():
    from vllm_clasp.governor import last_shares

    # level: each as likely as any to end last
    assert np.allclose(last_shares([40] * 8), 1 / 8)
    # one has drafted its way a few tokens ahead: its tokens count less, the others' more
    s = last_shares([34] + [40] * 7)
    assert s[0] < 0.01 and np.allclose(s[1:], (1 - s[0]) / 7)
    # one token ahead still counts
    s = last_shares([39, 40, 40, 40])
    assert 0.1 < s[0] < s[1] and np.isclose(s.sum(), 1.0)


def test_a_token_counts_for_the_batch_end_as_far_as_the_sequences_level_with_it_move_too():
    from vllm_clasp.governor import joint_shares, last_shares

    level = last_shares([40] * 4)
    # all copy alike, surely: the linear shares stand
    assert np.allclose(joint_shares(level, [1.0] * 4), level)
    # one copies, the others have nothing to draft: its token does not move the end
    s = joint_shares(level, [0.9, 0.0, 0.0, 0.0])
    assert s[0] == 0.0 and np.allclose(s[1:], level[1:] * 0.9 / 3)
    # the others' chances count by their shares: one far ahead (no share) does not help
    ahead = last_shares([30, 40, 40])
    s = joint_shares(ahead, [0.9, 0.8, 0.1])
    assert np.isclose(s[1], ahead[1] * (ahead[0] * 0.9 + ahead[2] * 0.1) / (ahead[0] + ahead[2]))
    assert s[1] < 0.2 * ahead[1]
    # a single sequence is the batch's end by itself
    assert np.allclose(joint_shares([1.0], [0.3]), [1.0])


def test_wave_drafts_move_the_slowest_sequences_together_or_not_at_all():
    from vllm_clasp.governor import wave_draft_lengths

    cost = _linear(0.053 - 0.0022 * 16, 0.0022)  # batch 16 here: every verified token costs
    sure = np.cumprod([0.95] * 6)
    weak = np.cumprod([0.3] * 6)
    # both critical sequences have sure drafts: one common depth for them, nothing for the others
    got = wave_draft_lengths([sure, sure, sure], [True, True, False], False, 16, cost)
    assert got[0] == got[1] > 0 and got[2] == 0
    # one critical sequence has nothing to draft: the batch's end cannot move, nobody drafts
    assert wave_draft_lengths([sure, sure], [True, False], True, 16, cost) == [0, 0]
    # a weak draft on one critical sequence makes a deep common draft worthless
    assert wave_draft_lengths([sure, weak], [True, True], False, 16, cost)[0] <= 1
    # verification free (below the knee, as at batch 1-8 here): the others may use the room
    flat = StepCost()
    for t in (1, 2, 3, 4, 5, 6) * 20:
        flat.add(t, 0.033)
    assert wave_draft_lengths([weak, sure], [True, False], True, 2, flat) == [0, 6]
    # blocked, the critical sequences that have drafts are worth at least what the others are
    got = wave_draft_lengths([sure, sure, np.zeros(0)], [True, True, True], True, 3, flat)
    assert got[0] > 0 and got[1] > 0 and sum(got) == 8 - 3 and got[2] == 0


def test_wave_drafts_are_verified_for_their_share_of_the_batch_end_even_when_blocked():
    """Measured at bs 8 on Translation: the rows that run to max_tokens copy their source while
    the rest end at EOS; with every row critical and one without a draft, the common-depth rule
    drafted nothing (1.00x) where ngram made 1.19x. A row's tokens are worth its share of a step
    at the batch's end (``last_shares``)."""
    from vllm_clasp.governor import wave_draft_lengths

    cost = _linear(0.053 - 0.0022 * 16, 0.0022)  # batch 16 here: every verified token costs 2.2 ms
    sure, weak, none = np.cumprod([0.95] * 6), np.cumprod([0.3] * 6), np.zeros(0)
    crit = [True] * 16
    drafts = [sure, sure, weak] + [none] * 13
    # blocked: without shares nobody drafts; with none for row 1 only rows 0 and 2 may, and the
    # weak draft does not pay
    assert wave_draft_lengths(drafts, crit, True, 16, cost) == [0] * 16
    got = wave_draft_lengths(drafts, crit, True, 16, cost, shares=[1 / 16, 0, 1 / 16] + [0] * 13)
    assert got[:3] == [6, 0, 0] and sum(got) == 6
    # a share of 1/16 of a step makes 2.2 ms a token pay above ~0.66 (0.95^7 = 0.70 passes,
    # 0.95^8 = 0.66 not); a share of 1/4 above ~0.17
    longer = np.cumprod([0.95] * 12)
    assert wave_draft_lengths([longer] + [none] * 15, crit, True, 16, cost, shares=[1 / 16] + [0] * 15)[0] == 7
    assert wave_draft_lengths([longer] + [none] * 15, crit, True, 16, cost, shares=[1 / 4] + [0] * 15)[0] == 12
    # however much a token's share of a step is worth, not below an even chance
    fading = np.cumprod([0.8] * 6)  # 0.8, 0.64, 0.51, 0.41, ...
    assert wave_draft_lengths([fading] + [none] * 15, crit, True, 16, cost, shares=[1 / 4] + [0] * 15)[0] == 3
    # a step that drafts nothing else must also cover the once-per-step cost of drafting
    dear = StepCost()
    rng = np.random.default_rng(3)
    for _ in range(400):
        t = int(rng.integers(17, 40)) if rng.random() < 0.7 else 16
        dear.add(t, 0.053 + 0.03 * (t > 16) + 0.0021 * (t - 16), t > 16)
    assert wave_draft_lengths(drafts, crit, True, 16, dear, shares=[1 / 16, 0, 1 / 16] + [0] * 13) == [0] * 16


def test_below_knee_tokens_do_not_ride_along_with_tokens_drafted_for_the_batch_end():
    """Cheap-looking tokens below the fitted knee must pay the once-per-step cost of drafting
    themselves: a step drafting for one sequence's share of the batch's end does not carry them
    (bs 16 QA, one chunk: 493 verified, 112 accepted, 0.90x)."""
    from dataclasses import dataclass

    from vllm_clasp.governor import wave_draft_lengths

    @dataclass
    class Fitted:  # a step-cost fit as StepCostAt reads it: 50 ms, knee at 20, 2 ms a token past it
        kappa: float = 0.006
        context: float = 0.1
        per_row: float = 0.001

        def fit(self):
            return 0.05, 0.002, 20, 0.003

        def __call__(self, tokens, drafted=False):
            return 0.05 + 0.002 * max(0, tokens - 20) + (0.003 if drafted else 0.0)

    sure, weak, none = np.cumprod([0.95] * 6), np.cumprod([0.3] * 6), np.zeros(0)
    drafts, crit = [sure, weak, weak, weak] + [none] * 4, [True] * 8
    # the sure draft's context is long (its tokens' attention: 30 ms each), the others' short
    ctx = [5.0, 0.05, 0.05, 0.05] + [0.05] * 4
    assert wave_draft_lengths(drafts, crit, True, 8, Fitted(), ctx) == [0] * 8
    got = wave_draft_lengths(drafts, crit, True, 8, Fitted(), ctx, shares=[1 / 8] + [0] * 7)
    assert got == [4] + [0] * 7  # 0.95^4 * (50/8 + 1 + 30) ms < 30 ms: four tokens pay


def test_may_use_skip_foretells_every_layer_skip_step_and_is_mostly_no_when_skip_loses():
    """Asked before the forward (whether to capture hidden states for plans): it must say yes
    whenever the step then drafts with layer skip, and no on most steps while layer skip loses."""

    class Foretold(Engine):
        def run(self, gov, rows, steps):
            said = []
            orig = gov.use_skip

            def use_skip(r):
                said.append(gov.may_use_skip(r))
                return orig(r)

            gov.use_skip = use_skip
            try:
                return list(zip(said, super().run(gov, rows, steps)))
            finally:
                del gov.use_skip

    for e, rows in ((Engine(acc=0.1, kappa=1.0), 1), (Engine(), 1), (Engine(), 16), (Engine(acc=2.5), 4)):
        g = Governor()
        pairs = Foretold(e.a, e.b, e.d, e.acc, e.kappa).run(g, rows, 1500)
        assert all(said for said, used in pairs if used)
    losing = Foretold(acc=0.1, kappa=1.0).run(Governor(), 1, 1500)
    assert share([said for said, _ in losing[-1000:]]) < 0.1
    assert all(said for said, _ in Foretold().run(Governor(enabled=False), 8, 20))


def test_step_cost_tells_a_sequence_from_a_verified_token():
    """A shrinking batch: fewer sequences make cheaper steps. Without the per-row term that
    passes for a per-token slope from very few tokens on, and nothing below 8 tokens looks free."""
    rng = np.random.default_rng(1)
    c = StepCost()
    for _ in range(600):
        rows = int(rng.integers(5, 9))
        t = rows + int(rng.integers(0, 9)) * (rng.random() < 0.3)
        sec = 0.030 + 0.0015 * rows + 0.0019 * max(0, t - 12) + 0.001 * (t > rows)
        c.add(t, sec * (1 + 0.01 * rng.standard_normal()), t > rows, rows)
    a, b, k, cc = c.fit(8)
    # near-ties between knees go to the mildest slope (few steps lie past 12): 10 or 12 here
    assert 10 <= k <= 12 and 0 < b < 0.0025 and abs(c.per_row - 0.0015) < 0.0003
    assert abs(a - (0.030 + 0.0015 * 8)) < 0.003


def test_step_cost_moments_are_the_decayed_sums_however_often_they_are_fitted():
    rng = np.random.default_rng(3)
    steps = [(float(rng.integers(1, 40)), float(rng.random() < 0.5), float(rng.integers(1, 16)), float(rng.random()),
              float(rng.random())) for _ in range(100)]
    knees = np.asarray([0, 2, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256], dtype=float)
    want = np.zeros((len(knees), 6, 6))
    for t, z, r, wk, y in steps:
        v = np.stack([np.ones_like(knees), np.maximum(t - knees, 0), np.full_like(knees, z), np.full_like(knees, r),
                      np.full_like(knees, wk), np.full_like(knees, y)], 1)
        want = want * 0.99 + v[:, :, None] * v[:, None, :]
    every, once = StepCost(), StepCost()
    for t, z, r, wk, y in steps:
        every.add(t, y, bool(z), r, wk)
        every.fit()
        once.add(t, y, bool(z), r, wk)
    once.fit()
    np.testing.assert_allclose(every.m, want, rtol=1e-9)
    np.testing.assert_allclose(once.m, want, rtol=1e-9)
    np.testing.assert_allclose(every._solve(), once._solve(), rtol=1e-9)  # fits may lag by refit_every steps


def test_no_probes_where_even_perfect_drafts_could_not_pay():
    # At 16 rows a verified token costs ~0.7 tokens and drafting time more than the rest: even
    # drafts that were all accepted would lose, so no probe is made (21 in 2000 steps without
    # this check). Back at batch 1 they pay again and are used at once.
    g = Governor()
    e = Engine()
    assert share(e.run(g, 1, 200)[20:]) > 0.95
    at16 = e.run(g, 16, 2000)
    assert share(at16[10:]) == 0
    assert g.skip.could_pay(g.token_price(1), g.rate(1)) and not g.skip.could_pay(g.token_price(16), g.rate(16))
    assert share(e.run(g, 1, 100)[5:]) > 0.95


def test_tokens_beyond_the_sizes_seen_are_not_free():
    """Batch 16, no request waiting, next to no drafts: every step verified 15–17 tokens and they
    all took ~48 ms, so no slope shows. Measured here: 'no slope' then meant 'free' at any size,
    and the next step verified 120 tokens (208 ms, ~20 % of them accepted; 0.84x on that chunk)."""
    rng = np.random.default_rng(5)
    c = StepCost()
    for _ in range(90):
        t = int(rng.choice([15, 16, 16, 16, 17]))
        c.add(t, 0.048 * (1 + 0.03 * rng.standard_normal()), t > 16, min(t, 16))
    assert c.marginal(17) == 0.0  # a little past what was seen: free, so the sizes grow
    assert c(40, rows=16) > 1.5 * c(16, rows=16) and c.marginal(40) > 0.001


def _probe_begun(g):
    return g.probing and g._probe_left > 0


def test_a_probe_does_not_run_on_into_another_batch():
    """Measured in the bs-8 bench: a probe began on a batch's one-row tail and its last step fell
    on the next batch's first step at 8 rows: a plan and a one-row draft there (~90 ms, 2-3 % of
    that chunk). A probe's steps stay at the batch size it began at and end at a pause."""
    g = Governor()
    e = Engine(acc=0.1, kappa=1.0)  # layer-skip loses at one row: only probes draft
    e.run(g, 1, 100)
    assert _probe_begun(g) or e.run(g, 1, 3000, until=_probe_begun)[-1]
    assert _probe_begun(g)
    assert not any(e.run(g, 8, 30))  # the next batch: no probe step at 8 rows

    e.run(g, 1, 5000, until=_probe_begun)
    assert _probe_begun(g)
    g.observe(1, True, now=e.t + 2.0, scheduled=1, rows=1)  # ~30 typical steps idle: a pause
    assert not g.use_skip(1)


def test_probes_spend_in_proportion_to_the_time_where_layer_skip_could_pay():
    """A bs-8 workload whose batches end in a few one-row steps: drafts could pay only there, so
    probes get the budget's share of that time, not of all of it (the old budget made 11 probes
    here, ~0.3 % of the time and 2-3 % of each batch it fell on). Back at batch 1 with drafts that
    pay, they are on within a few dozen steps."""
    g = Governor()
    e = Engine(acc=0.1, kappa=1.0)
    e.run(g, 1, 50)
    t0, p0 = e.t, g._probe_s
    for _ in range(100):
        e.run(g, 8, 60)
        e.run(g, 1, 3)
    assert g._probe_s - p0 < 0.2 * g.probe_budget * (e.t - t0)
    back = Engine(acc=2.5).run(g, 1, 300)
    assert True in back[:40] and share(back[-100:]) > 0.95


def _attention_bound_steps(g, rng, context, sizes, steps, t0):
    """bs 8 on the AMX host, as measured (scripts/step_cost_probe.py): a step costs ~46 ms for
    its weights, 1.5 ms per token past 12, and ~5.9 ms per verified token per 1000 tokens of
    context. Each step verifies one of ``sizes`` tokens over 8 sequences of ``context`` tokens."""
    t = t0
    for _ in range(steps):
        size = int(rng.choice(sizes))
        work = size * context / 1000.0
        t += (0.046 + 0.0015 * max(0, size - 12) + 0.0059 * work) * (1 + 0.02 * rng.standard_normal())
        g.observe(8 + (size > 8), True, now=t, scheduled=size, rows=8, work=work)
        g.finish(1 if size > 8 else 0, 0.0, 0.0, now=t)
    return t


def test_draft_tokens_over_long_contexts_are_not_free():
    """Measured at bs 8 (AMX host): after Translation (short prompts, many drafted steps) the fit
    put 18-token steps below its knee, and Summarization (~760-token prompts) verified 581
    context-draft tokens, 18 % accepted, at ~3.4 ms each: 0.88x plain on that chunk. Each token
    attends over its context; priced so, the long-context drafts are cut and the short ones kept."""
    rng = np.random.default_rng(7)
    g = Governor()
    g.finish(0, 0.0, 0.0, now=0.0)
    t = _attention_bound_steps(g, rng, 150, [8, 8, 12, 16, 20, 24], 400, 0.0)
    t = _attention_bound_steps(g, rng, 760, [8], 120, t)
    cost = g.step_cost(8)
    assert abs(cost.kappa - 0.0059) < 0.0015 and abs(g.context - 0.76) < 1e-9
    # a token below the knee, over 760 tokens, costs its attention (~4.5 ms), not nothing
    assert cost.marginal(9) > 0.003
    assert cost(18) - cost(8) > 0.03
    weak = [np.cumprod(np.full(10, 0.45)) for _ in range(8)]  # ~18 % of the tokens accepted
    assert sum(g.draft_lengths(weak, 8, 8, contexts=[0.76] * 8)) <= 8
    assert sum(g.draft_lengths(weak, 8, 8, [True] * 8, False, contexts=[0.76] * 8)) == 0
    # the same drafts over 100-token contexts cost ~0.6 ms a token: the surest are worth it
    assert sum(g.draft_lengths(weak, 8, 8, contexts=[0.1] * 8)) >= 8


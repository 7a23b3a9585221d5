"""The speculation governor picks the measured-faster mode and keeps probing the other."""

from vllm_clasp.governor import Governor, batch_bucket


def simulate(spec_rate, plain_rate, steps=400, num_seqs=1, gov=None):
    """Each step takes 1 s; commits `rate` tokens in whichever mode the governor chose."""
    g = gov or Governor()
    t = 0.0
    modes = []
    mode = None
    for _ in range(steps):
        if mode is not None:
            t += 1.0
            g.observe(spec_rate if mode else plain_rate, measurable=True, now=t)
        mode = g.decide(num_seqs)
        modes.append(mode)
        g.finish(mode, num_seqs, 0.0, now=t)
    return modes


def test_prefers_plain_when_spec_is_slower():
    modes = simulate(spec_rate=0.8, plain_rate=1.0)
    tail = modes[100:]
    assert sum(tail) / len(tail) < 0.2, "mostly plain once measured"
    assert any(tail), "keeps probing speculation"


def test_prefers_spec_when_it_pays():
    modes = simulate(spec_rate=1.6, plain_rate=1.0)
    tail = modes[100:]
    assert sum(tail) / len(tail) > 0.8
    assert not all(tail), "keeps probing plain decoding"


def test_follows_a_change_in_workload():
    g = Governor()
    simulate(spec_rate=0.7, plain_rate=1.0, gov=g, steps=200)
    modes = simulate(spec_rate=2.0, plain_rate=1.0, gov=g, steps=400)
    assert sum(modes[-100:]) > 80


def test_disabled_always_speculates_and_buckets():
    assert all(simulate(0.1, 1.0, gov=Governor(enabled=False), steps=50))
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]


def test_unmeasurable_and_idle_steps_are_ignored():
    g = Governor()
    g.finish(True, 1, 0.0, now=0.0)
    g.observe(5, measurable=False, now=1.0)
    g.observe(5, measurable=True, now=100.0)  # idle gap
    assert g.rate(1, True).steps == 0

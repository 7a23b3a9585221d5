"""The benchmark command: question selection, method parsing, aggregation, and a small real run."""

import json
import subprocess
import sys

import pytest

from vllm_clasp.bench import (
    Chunk, GROUPS, Method, add_arguments, chunk_plan, main, markdown, paired_interval, parse_methods,
    questions_by_group, summarize, verdict,
)


def test_questions_by_group_takes_mt_bench_categories_in_turn():
    qs = questions_by_group(8)
    assert [q.group for q in qs] == [g for g in GROUPS for _ in range(8)]
    assert len({q.category for q in qs if q.group == "MT-bench"}) == 8
    with pytest.raises(ValueError, match="unknown Spec-Bench groups"):
        questions_by_group(1, ["Poetry"])


def test_question_file_of_ones_own(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"category": "haiku", "prompt": "Write a haiku about rain."}\n\n'
                 '{"question_id": 7, "category": "qa", "turns": ["Who wrote Hamlet?", "And Macbeth?"]}\n'
                 '{"category": "haiku", "prompt": "Write a haiku about snow."}\n'
                 '{"category": "math_reasoning", "prompt": "What is 2 + 3?"}\n')
    qs = questions_by_group(2, path=f)
    assert [(q.group, q.text) for q in qs] == [
        ("haiku", "Write a haiku about rain."), ("haiku", "Write a haiku about snow."),
        ("QA", "Who wrote Hamlet?"), ("Math", "What is 2 + 3?")]  # Spec-Bench's categories keep their groups
    assert qs[2].question_id == 7 and qs[0].question_id == 1
    assert [q.text for q in questions_by_group(2, ["haiku"], offset=1, path=f)] == ["Write a haiku about snow."]
    with pytest.raises(ValueError, match=r"unknown groups in .*mine.jsonl \['RAG'\]; known: \['haiku', 'QA', 'Math'\]"):
        questions_by_group(1, ["RAG"], path=f)
    with pytest.raises(ValueError, match=r"no haiku questions left after --offset 2 \(its categories hold 2\)"):
        questions_by_group(1, path=f, offset=2)
    with pytest.raises(ValueError, match=r"no MT-bench questions left after --offset 16 \(its categories hold 10, 10"):
        questions_by_group(4, offset=16)  # MT-bench's eight categories hold 10 questions each
    for text, msg in [('{"category": "x"}', "line 1: needs 'turns'"), ('{"prompt": "hi"}', "line 1: needs a non-empty"),
                      ("[1]", "line 1: expected a JSON object"), ("{oops", "line 1: not JSON"), ("\n", "holds no questions")]:
        f.write_text(text)
        with pytest.raises(ValueError, match=msg):
            questions_by_group(1, path=f)
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    for argv, msg in [(["--questions", str(tmp_path / "none.jsonl")], "cannot read question file"),
                      (["--questions", str(f)], "holds no questions"), (["--offset", "-1"], "--offset must be >= 0")]:
        with pytest.raises(SystemExit, match=msg):
            main(p.parse_args(argv))


def test_parse_methods_adds_plain_and_refuses_bad_input():
    ms = parse_methods("clasp", ['n3={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}'], {})
    assert [m.name for m in ms] == ["plain", "clasp", "n3"]
    for bad, msg in [(("foo", []), "unknown method"), (("plain", ["x"]), "NAME=JSON"),
                     (("plain", ["x={"]), "not valid JSON"), (("plain", ["x=[]"]), "'method' key")]:
        with pytest.raises(ValueError, match=msg):
            parse_methods(*bad, {})
    with pytest.raises(ValueError, match="skip_layerz"):
        parse_methods("clasp", [], {"skip_layerz": 2})


def test_queue_mode_puts_more_prompts_than_slots_in_one_call():
    qs = questions_by_group(5, ["QA", "Math"])
    assert [(g, len(i)) for g, i in chunk_plan(qs, 2)] == [("QA", 2), ("QA", 2), ("QA", 1), ("Math", 2),
                                                          ("Math", 2), ("Math", 1)]
    plan = chunk_plan(qs, 8)  # a queue never mixes groups: a group's ratio stays its own
    assert [(g, i) for g, i in plan] == [("QA", [0, 1, 2, 3, 4]), ("Math", [5, 6, 7, 8, 9])]
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(SystemExit, match="--queue must be >= --batch-size"):
        main(p.parse_args(["--batch-size", "8", "--queue", "4"]))


def _chunk(method, rep, group, seconds, tokens, accepted=0.0, outputs=None):
    return Chunk(method, rep, group, [0], seconds, tokens, outputs or [[1, 2]],
                 {"drafts": accepted, "draft_tokens": 2 * accepted, "accepted": accepted})


def test_summarize_speedup_tau_spread_and_identical_share():
    methods = [Method("plain", None), Method("fast", {"method": "ngram"})]
    chunks = [
        _chunk("plain", 0, "QA", 10.0, 100), _chunk("fast", 0, "QA", 5.0, 100, accepted=50),
        _chunk("plain", 1, "QA", 10.0, 100), _chunk("fast", 1, "QA", 8.0, 100, accepted=50, outputs=[[9]]),
    ]
    t = summarize(chunks, methods)["table"]
    row = t["fast"]["QA"]
    assert row["speedup_min"] == pytest.approx(1.25) and row["speedup_max"] == pytest.approx(2.0)
    assert row["speedup"] == pytest.approx(1.625)
    assert row["tau"] == pytest.approx(200 / (200 - 100))
    assert row["acceptance"] == pytest.approx(0.5)
    assert row["identical"] == pytest.approx(0.5)
    assert t["fast"]["Overall"]["speedup"] == pytest.approx(1.625)
    assert row["pairs"] == 2 and row["paired"][0] == pytest.approx((2.0 * 1.25) ** 0.5)
    md = markdown(summarize(chunks, methods), "header")
    assert "1.62 [1.25–2.00]" in md and "fast 50 %" in md and "1.58 [" in md


def test_paired_interval_and_verdict():
    assert paired_interval([1.1]) is None and verdict(None) == "?"
    gm, lo, hi = paired_interval([1.0, 1.0, 1.0])
    assert gm == lo == hi == pytest.approx(1.0) and verdict((gm, lo, hi)) == "="
    gm, lo, hi = paired_interval([1.5, 1.6, 1.55, 1.45])
    assert lo > 1.0 and verdict((gm, lo, hi)) == "faster"
    assert verdict(paired_interval([0.8, 0.82, 0.79])) == "slower"
    # Two pairs a lot apart: t with 1 degree of freedom (12.7) keeps the verdict open.
    assert verdict(paired_interval([0.9, 1.2])) == "="


@pytest.mark.slow
def test_bench_command_end_to_end_on_the_tiny_model(tiny_model, tmp_path):
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "vllm_clasp.cli", "bench", "--model", tiny_model, "--groups", "QA,Math",
           "--per-group", "3", "--max-tokens", "12", "--repeats", "2", "--batch-size", "2", "--queue", "3",
           "--out", str(out), "--control",
           "--no-progress", "--clasp-config", '{"adaptive": false, "skip_layers": 2}']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["table"]) == {"plain", "plain-2", "ngram", "clasp"} and res["repeats"] == 2
    assert res["table"]["plain-2"]["Overall"]["identical"] == 1.0  # the control: a second plain engine
    assert res["untimed_first_engine"]  # on CPU the first engine made (the slow one) is not timed
    assert "an untimed engine made first" in (out / "results.md").read_text()
    assert "noise floor" in (out / "results.md").read_text()
    overall = res["table"]["clasp"]["Overall"]
    assert overall["identical"] == 1.0 and overall["vllm_draft_tokens"] > 0
    assert overall["clasp"]["layers_skipped"] == pytest.approx(2.0)
    assert len(overall["tokens_per_s_by_repeat"]) == 2 and "3 prompts per call" in res["setting"]
    assert (out / "speedup.png").stat().st_size > 1000 and "Overall" in (out / "results.md").read_text()
    sweep = tmp_path / "s"  # and on prompts of one's own
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"category": c, "prompt": p}) + "\n" for c, p in [
        ("haiku", "Write a haiku about rain."), ("recall", "Repeat: one two three one two three one two"),
        ("haiku", "Write a haiku about snow.")]))
    cmd = cmd[: cmd.index("--groups")] + cmd[cmd.index("--per-group"): cmd.index("--out")] + [
        "--questions", str(mine), "--out", str(sweep), "--sweep-skip", "1,2", "--sweep-k", "2,3", "--repeats", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    sw = json.loads((sweep / "sweep.json").read_text())
    assert "3 questions from mine.jsonl" in sw["setting"]
    cells = sw["cells"]
    assert {(c["skip_layers"], c["k"]) for c in cells} == {(1.0, 2), (1.0, 3), (2.0, 2), (2.0, 3)}
    assert all(c["identical"] == 1.0 for c in cells) and (sweep / "sweep.png").exists()


def test_breakdown_splits_the_step_and_its_command_runs(tiny_model, tmp_path):
    from vllm_clasp.breakdown import PARTS, split_step_time

    parts = split_step_time({"step": 1.0, "forward": 0.5, "prepare": 0.05, "sampler": 0.1, "bookkeeping": 0.05},
                            {"draft_s": 0.1, "plan_s": 0.05})
    assert set(parts) == set(PARTS) and parts["scheduler & rest"] == pytest.approx(0.15)
    assert sum(parts.values()) == pytest.approx(1.0)
    out = tmp_path / "bd"
    cmd = [sys.executable, "-m", "vllm_clasp.cli", "breakdown", "--model", tiny_model, "--groups", "QA",
           "--per-group", "2", "--batch-sizes", "1,2", "--max-tokens", "8", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "breakdown.json").read_text())["rows"]
    assert {(r["method"], r["batch_size"]) for r in rows} == {
        (m, b) for m in ("plain", "clasp as published", "clasp") for b in (1, 2)}
    for row in rows:
        ms = row["ms_per_token"]
        assert row["tokens"] > 0 and ms["forward"] > 0 and ms["sampler"] > 0
        if row["method"] == "plain":
            assert ms["drafting"] == 0 and ms["planning"] == 0
    assert any(r["ms_per_token"]["planning"] > 0 for r in rows if r["method"] == "clasp as published")
    assert (out / "breakdown.png").stat().st_size > 1000
    bad = subprocess.run(cmd[:-2] + ["--batch-sizes", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--batch-sizes" in bad.stderr


def test_cpu_isa_names_the_widest_vector_unit(tmp_path):
    from vllm_clasp.bench import cpu_isa

    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert cpu_isa(str(f)) == " (AVX-512)"
    f.write_text("flags\t\t: fpu sse2 avx2\n")
    assert cpu_isa(str(f)) == " (AVX2)"
    assert cpu_isa(str(tmp_path / "missing")) == ""

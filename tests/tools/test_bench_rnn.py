"""benchmarks/bench_rnn.py: the variants' rows, the kernel they record, the merge into an existing JSON and
the pages rendered from it. Tiny sizes and one round: these check the machinery, never a time."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

import recnorm
from recnorm import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import allocator  # noqa: E402
import bench_rnn  # noqa: E402

REAL_SET_ALLOCATOR = allocator.set_allocator  # the tests' fixture replaces it (see below)

TINY = (3, 2, 3, 4)
QUIET = lambda msg: None  # noqa: E731


@pytest.fixture(autouse=True)
def _clean_failed():
    bench_rnn.FAILED.clear()
    yield
    bench_rnn.FAILED.clear()


@pytest.fixture(autouse=True)
def _allocator_recorded_not_set(monkeypatch):
    """``main`` records the allocator setting without changing this test process's malloc (mallopt holds for
    the rest of a process): the real setting is tested in a child process."""
    settings = []

    def fake(name):
        settings.append(name)
        return {"name": name, "mallopt": dict(allocator.STEADY) if name == "steady" else {}}

    monkeypatch.setattr(allocator, "set_allocator", fake)
    return settings


def _rows(kernel=None):
    return bench_rnn.measure_time(["lstm", "gru", "rnn"], [], [], 1, kernel, QUIET, variant_sizes=[TINY])


def test_every_variant_has_a_train_and_eval_row_with_its_baseline_and_kernel():
    rows = _rows()
    idx = {(r["candidate"], r["mode"]): r for r in rows}
    for cell, variants in bench_rnn.VARIANTS.items():
        for name, kwargs in variants.items():
            label = bench_rnn.variant_label(cell, name)
            for mode in ("train", "eval"):
                r = idx[(label, mode)]
                assert math.isfinite(r["ratio"]) and r["ratio"] > 0
                assert r["section"] == "variants" and r["variant"] == name
                assert r["baseline"] == bench_rnn.torch_label(cell, kwargs.get("num_layers", 1))
                assert (r["baseline"], mode) in idx  # the baseline was timed in the same rounds
                assert all(k in kernels.KERNELS for k in r["kernel"].split("+")), r["kernel"]
    assert idx[("recnorm.LSTM [between_layers='batch', 2 layers]", "train")]["baseline"] == "torch.nn.LSTM(num_layers=2)"
    if kernels.extensions_built():
        # issue 8: every variant runs on the fused kernels (or torch's op), never on the Python loop
        assert idx[("recnorm.LSTM [rms]", "train")]["kernel"] == "fused"
        slow = [(r["candidate"], r["mode"]) for r in rows if r.get("variant") and "reference" in r["kernel"]]
        assert not slow, slow


def test_the_kernel_column_follows_what_ran():
    # forcing the reference loop must show in every recnorm row: the label is recorded, not assumed
    rows = _rows(kernel="reference")
    ours = [r for r in rows if r["norm"] != "torch"]
    assert ours and all(r["kernel"] == "reference" for r in ours)
    assert all("kernel" not in r for r in rows if r["norm"] == "torch")


def test_variant_configurations_are_the_layers_arguments():
    for cell, variants in bench_rnn.VARIANTS.items():
        for name in variants:
            model, x = bench_rnn.build(cell, None, TINY, variant=name)
            assert isinstance(model, (recnorm.LSTM, recnorm.GRU, recnorm.RNN))
            text = bench_rnn.variant_config(cell, name)
            assert eval(f"dict({text})") == variants[name]


def _main(*argv, rc=0):
    assert bench_rnn.main([str(a) for a in argv]) == rc


class _Machine:
    """A fake machine for :class:`bench_rnn.LoadWatch`: its load average, the busy CPU seconds of the whole
    machine and of this process, and a clock, each set by the test (nothing is timed or read from the OS)."""

    def __init__(self, monkeypatch, load=0.05, others=0.0, spread=0.01):
        self.load, self.others, self.now, self.next = load, others, 0.0, 0.0
        monkeypatch.setattr(bench_rnn, "load_average", lambda: self.load)
        # each reading of the clock moves it 10 s on; by then this process has used 10 CPU s (one core) and
        # the others `others` cores
        monkeypatch.setattr(bench_rnn, "clock", self._clock)
        monkeypatch.setattr(bench_rnn, "own_cpu_seconds", lambda: self.now)
        monkeypatch.setattr(bench_rnn, "busy_cpu_seconds", lambda: self.now * (1.0 + self.others))
        if spread is not None:  # torch.nn's spread, and the A/A control's median known to within +-spread
            monkeypatch.setattr(bench_rnn, "spread", lambda times: spread)
            monkeypatch.setattr(bench_rnn, "aa_interval", lambda ratios: [1.0 - spread, 1.0 + spread])

    def _clock(self):
        self.now, self.next = self.next, self.next + 10.0
        return self.now


@pytest.fixture
def quiet_machine(monkeypatch):
    return _Machine(monkeypatch)


def test_only_variants_merges_into_an_existing_json_and_renders(tmp_path, capsys, quiet_machine):
    js, md, readme = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "README.md"
    size = ",".join(map(str, TINY))
    common = ["--rounds", 1, "--cells", "rnn", "--no-memory", "--no-compile", "--bf16-cells"]
    _main(*common, "--sizes", size, "--norms", "None", "--no-variants", "--json", js)
    before = json.loads(js.read_text())
    assert not [r for r in before["rows"] if r.get("section") == "variants"]

    _main(*common, "--only-variants", "--variant-sizes", size, "--json", js)
    merged = json.loads(js.read_text())
    main_rows, vrows = bench_rnn.split_rows(merged["rows"])
    assert main_rows == before["rows"]  # the main rows are kept as they were
    assert merged["meta"]["argv"] == before["meta"]["argv"] and "--only-variants" in merged["meta"]["variants"]["argv"]
    assert {r["variant"] for r in vrows if r.get("variant")} == set(bench_rnn.VARIANTS["rnn"])
    assert "rows new (no previous figure)" in " ".join(merged["regression"]["variants"])

    # a second merge replaces the variants' rows (no duplicates) and compares them with the first
    _main(*common, "--only-variants", "--variant-sizes", size, "--json", js)
    again = json.loads(js.read_text())
    assert len(again["rows"]) == len(merged["rows"])
    assert f"{2 * len(bench_rnn.VARIANTS['rnn'])} rows compared" in again["regression"]["variants"][0]

    readme.write_text(f"intro\n{bench_rnn.README_BEGIN}\nold\n{bench_rnn.README_END}\nrest\n")
    capsys.readouterr()
    _main("--render", js, "--out", md, "--readme", readme)
    page = md.read_text()
    assert "## Variants (issue 8)" in page and "Measured by `python benchmarks/bench_rnn.py " in page
    for name in bench_rnn.VARIANTS["rnn"]:
        assert f"| RNN | {name} |" in page
        assert f"| {bench_rnn.variant_label('rnn', name)} |" in page
    assert "recnorm.RNN(norm=None)" in page
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "Variants of issue 8" in text
    assert "recnorm.RNN [rms]" not in text  # variants are one summary line in the README, not table rows


def test_memory_only_re_measures_memory_into_an_earlier_json(tmp_path, quiet_machine, monkeypatch):
    """--memory-only times nothing: it replaces the selected candidates' memory figures (here stubbed, the
    subprocess measurement has its own test) and their ratios in the JSON, keeps every time, says when and at
    which commit on the page, and leaves the other candidates' figures alone."""
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    size = ",".join(map(str, TINY))
    common = ["--rounds", 1, "--cells", "rnn", "--no-compile", "--bf16-cells", "--sizes", size, "--no-variants"]
    monkeypatch.setattr(bench_rnn, "memory_of", lambda c, size, threads, kernel=None: 10.0 if c.label.startswith("torch") else 8.0)
    _main(*common, "--norms", "None", "layer", "--json", js)
    before = json.loads(js.read_text())
    monkeypatch.setattr(bench_rnn, "measure_time", lambda *a, **k: pytest.fail("--memory-only must time nothing"))
    monkeypatch.setattr(bench_rnn, "memory_of", lambda c, size, threads, kernel=None: 10.0 if c.label.startswith("torch") else 5.0)
    _main(*common, "--norms", "None", "--memory-only", "--json", js, "--out", md)
    after = json.loads(js.read_text())
    assert after["rows"] == before["rows"]  # the times are the earlier run's
    mem = after["memory_mib"]
    assert mem[f"recnorm.RNN(norm=None) {TINY}"] == 5.0 and mem[f"recnorm.RNN(norm='layer') {TINY}"] == 8.0
    assert "re-measured on" in after["meta"]["memory_remeasured"] and "at commit " in after["meta"]["memory_remeasured"]
    assert "**Memory.** The peak memory of" in md.read_text()
    partial = after["meta"]["memory_remeasured"]
    _main(*common, "--norms", "layer", "--memory-only", "--json", js, "--out", md)  # another partial one: both said
    assert json.loads(js.read_text())["meta"]["memory_remeasured"].startswith(partial + " Then the ")
    _main(*common, "--norms", "None", "layer", "--memory-only", "--json", js, "--out", md)  # all: supersedes them
    whole = json.loads(js.read_text())["meta"]["memory_remeasured"]
    assert whole.startswith("The peak memory of 3 candidates") and "Then the" not in whole
    with pytest.raises(SystemExit, match="expected an existing file"):
        bench_rnn.main([*map(str, common), "--memory-only", "--json", str(tmp_path / "none.json")])


def _section(page: str, start: str, end: str) -> str:
    return page.split(start, 1)[1].split(end, 1)[0]


def test_render_of_the_committed_json_keeps_its_tables(tmp_path):
    # the committed page and JSON come from one run: rendering the JSON again gives the same main tables
    out = tmp_path / "b.md"
    path = os.path.join(ROOT, "docs", "benchmarks.json")
    _main("--render", path, "--out", out)
    with open(os.path.join(ROOT, "docs", "benchmarks.md")) as f:
        committed = f.read()
    with open(path) as f:
        meta = json.load(f)["meta"]
    page = out.read_text()
    sections = [("## Every size, float32", "## What")]
    if not bench_rnn.run_reasons(meta):  # a quiet run's page judges the targets; another's must not
        sections.append(("## Against the targets", "## Every size"))
    else:
        assert "No verdict on the targets" in _section(page, "## Against the targets", "## Every size")
    for start, end in sections:
        assert _section(page, start, end) == _section(committed, start, end)
    assert "## Variants (issue 8)" in page


def test_memory_child_builds_a_variant():
    c = bench_rnn.Candidate("v", "lstm", None, variant="between_layers='batch', 2 layers", section="variants")
    mib = bench_rnn.memory_of(c, TINY, threads=1)
    assert mib is not None and mib >= 0


# -- issue 17: no verdict from a machine that is not quiet ------------------------------------------------


def test_spread_is_the_interquartile_range_over_the_median():
    assert bench_rnn.spread([1.0, 1.0]) is None  # too few rounds to tell
    # inclusive quartiles of 1, 2, 3, 4, 5 are 2 and 4; median 3
    assert bench_rnn.spread([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx(2.0 / 3.0)
    # one slow round of seven does not move it
    assert bench_rnn.spread([1.0] * 6 + [9.0]) == 0.0


def test_load_watch_counts_other_processes_cpu_only(monkeypatch):
    m = _Machine(monkeypatch, load=0.2, others=0.75, spread=None)
    watch = bench_rnn.LoadWatch()
    m.load = 1.9  # this run's own threads raise the load average: not held against the machine
    rec = watch.stop()
    assert rec == {"load_before": 0.2, "load_after": 1.9, "others_load": 0.75}


def _meta(load_before=0.1, others=0.1, spread=0.02, **extra):
    quiet = {"load_before": load_before, "load_after": 1.5, "others_load": others,
             "torch_spread": {"spread": spread, "candidate": "torch.nn.LSTM", "size": [28, 128, 28, 128], "mode": "eval"}}  # fmt: skip
    return dict({"argv": "x", "quiet": quiet}, **extra)


def test_not_quiet_names_every_reason_and_follows_the_thresholds():
    assert bench_rnn.not_quiet(_meta()) == []
    assert bench_rnn.not_quiet({"argv": "x"}) == ["the load was not recorded (a run from before issue 17)"]
    why = bench_rnn.not_quiet(_meta(load_before=1.3, others=0.9, spread=0.25))
    assert len(why) == 3
    assert "load average 1.30 before" in why[0] and "0.90 cores" in why[1]
    assert "moved by 25%" in why[2] and "torch.nn.LSTM" in why[2] and "(28, 128, 28, 128)" in why[2]
    assert "unknown" in bench_rnn.not_quiet(_meta(spread=None))[0]
    # the thresholds are options
    assert bench_rnn.not_quiet(_meta(load_before=1.3, spread=0.25), max_load=2.0, max_spread=0.3) == []
    assert bench_rnn.not_quiet(_meta(load_before=0.3), max_load=0.2) != []
    # a variants' run merged in from elsewhere is judged too
    meta = _meta(variants=_meta(others=3.0, argv="y"))
    assert bench_rnn.run_reasons(meta) == [w for w in bench_rnn.run_reasons(meta) if w.startswith("variants' run:")] != []


_ARGS = ["--rounds", 3, "--cells", "rnn", "--norms", "None", "--no-memory", "--no-compile", "--bf16-cells", "--no-variants"]


def _readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench_rnn.README_BEGIN}\nold\n{bench_rnn.README_END}\nrest\n")
    return readme


@pytest.mark.parametrize("busy", ["load", "others", "spread"])
def test_a_busy_machine_gets_no_verdict_and_leaves_readme_alone(tmp_path, monkeypatch, capsys, busy):
    _Machine(monkeypatch, load=1.2 if busy == "load" else 0.1, others=1.5 if busy == "others" else 0.0,
             spread=0.4 if busy == "spread" else 0.01)  # fmt: skip
    js, md, readme = tmp_path / "b.json", tmp_path / "b.md", _readme(tmp_path)
    _main(*_ARGS, "--sizes", ",".join(map(str, TINY)), "--json", js, "--out", md, "--readme", readme, rc=2)
    err = capsys.readouterr().err
    assert "not quiet" in err and "left as it is" in err
    assert "\nold\n" in readme.read_text()  # untouched
    page = md.read_text()
    targets = _section(page, "## Against the targets", "## Every size")
    assert "No verdict on the targets" in targets
    assert not [line for line in targets.splitlines() if line.startswith("|") and "**" in line]  # nothing judged
    assert "(≤ 0.9)" not in targets
    meta = json.loads(js.read_text())["meta"]
    assert bench_rnn.run_reasons(meta)  # the JSON keeps why, so a later --render refuses too
    _main("--render", js, "--out", md, "--readme", readme, rc=2)
    assert "\nold\n" in readme.read_text()
    # thresholds raised on purpose: the judgement follows the options, and the page says the load
    _main("--render", js, "--out", md, "--readme", readme, "--max-load", 5, "--max-noise", 1)
    assert "\nold\n" not in readme.read_text() and "Load average" in readme.read_text()


def test_a_quiet_machine_gets_a_verdict_and_its_readme_table(tmp_path, quiet_machine):
    js, md, readme = tmp_path / "b.json", tmp_path / "b.md", _readme(tmp_path)
    _main(*_ARGS, "--sizes", ",".join(map(str, TINY)), "--json", js, "--out", md, "--readme", readme)
    meta = json.loads(js.read_text())["meta"]
    assert meta["quiet"]["load_before"] == 0.05 and meta["quiet"]["others_load"] == 0.0
    assert meta["quiet"]["torch_spread"]["spread"] == 0.01 and meta["quiet"]["torch_spread"]["candidate"] == "torch.nn.RNN"
    assert meta["quiet"]["ratio_noise"]["noise"] == 0.01 and meta["quiet"]["ratio_noise"]["candidate"] == "torch.nn.RNN"
    assert meta["quiet"]["ratio_noise"]["measure"] == "interval" and meta["quiet"]["ratio_noise"]["interval"] == [0.99, 1.01]
    assert meta["commit"] and meta["min_time"] == bench_rnn.MIN_TIME
    assert meta["cpu"] == bench_rnn.cpu_model()  # the host: its ratios differ from another's
    if meta["cpu"]:
        assert f"Machine: {meta['machine']}, {meta['cpu']};" in md.read_text()
    targets = _section(md.read_text(), "## Against the targets", "## Every size")
    assert "No verdict" not in targets and "train (≤ 0.9)" in targets
    text = readme.read_text()
    assert "\nold\n" not in text and "recnorm.RNN(norm=None)" in text and "Load average 0.05 before" in text


def test_the_torch_rows_carry_their_spread(monkeypatch):
    rows = bench_rnn.measure_time(["rnn"], [None], [TINY], 6, None, QUIET)
    torch_rows = [r for r in rows if r["norm"] == "torch"]
    assert torch_rows and all(r["spread"] is not None and r["spread"] >= 0 for r in torch_rows)
    assert all("spread" not in r for r in rows if r["norm"] != "torch")
    assert bench_rnn.worst_spread(rows)["spread"] == round(max(r["spread"] for r in torch_rows), 4)
    # the A/A control: no rows of its own; its ratio, spread and the interval of its median on torch.nn's rows
    assert not [r for r in rows if bench_rnn.CONTROL in r["candidate"]]
    assert all(r["aa_ratio"] > 0 and r["aa_spread"] is not None for r in torch_rows)
    for r in torch_rows:
        lo, hi = r["aa_ci"]
        assert lo <= r["aa_ratio"] <= hi and r["aa_noise"] == round(max(abs(lo - 1), abs(hi - 1)), 4)
    worst = bench_rnn.worst_noise(rows)
    assert worst["measure"] == "interval" and worst["noise"] == max(r["aa_noise"] for r in torch_rows)
    assert worst["interval"] in [r["aa_ci"] for r in torch_rows]
    # every row: the interval of its median ratio, from the 6 rounds' extremes (n = 6: min and max at 95%)
    for r in rows:
        assert r["rounds"] == 6 and r["calls"] == {"train": 1, "eval": 1}[r["mode"]]
        assert r["ratio_ci"][0] <= round(r["ratio"], 4) <= r["ratio_ci"][1]
    # with fewer than 6 rounds there is no interval, so the noise is unknown and the run is not judged
    rows = bench_rnn.measure_time(["rnn"], [None], [TINY], 5, None, QUIET)
    assert all(r["ratio_ci"] is None for r in rows) and bench_rnn.worst_noise(rows)["noise"] is None


def test_each_round_has_its_own_random_order():
    labels = [f"c{i}" for i in range(8)]
    orders = {tuple(bench_rnn._order(labels, TINY, r, m)) for r in range(6) for m in ("train", "eval")}
    assert all(sorted(o) == labels for o in orders)  # a permutation of every candidate
    assert len(orders) > 6  # anew each round and mode
    assert bench_rnn._order(labels, TINY, 3, "eval") == bench_rnn._order(labels, TINY, 3, "eval")  # repeatable
    # no candidate keeps its place: each is first in some round
    firsts = {bench_rnn._order(labels, TINY, r, "train")[0] for r in range(60)}
    assert firsts == set(labels)


def test_a_timing_repeats_a_short_step_until_it_lasts_min_time(monkeypatch):
    calls = []
    now = [0.0]

    def step():  # a fake step of 4 ms on a fake clock
        calls.append(1)
        now[0] += 0.004

    monkeypatch.setattr(bench_rnn.time, "perf_counter", lambda: now[0])
    assert bench_rnn._calls(step, 0.05) == 13  # ceil(50 / 4)
    calls.clear()
    assert bench_rnn._time(step, 13) == pytest.approx(0.004) and len(calls) == 13
    assert bench_rnn._calls(step, 0.001) == 1
    # in a run: a clock that moves 1/256 s per reading (exact in binary) makes every step look that long, so a
    # timing of 1/16 s takes 16 calls
    ticks = iter(range(10**9))
    monkeypatch.setattr(bench_rnn.time, "perf_counter", lambda: next(ticks) / 256)
    rows = bench_rnn.measure_time(["rnn"], [None], [TINY], 1, None, QUIET, min_time=1 / 16)
    assert rows and all(r["calls"] == 16 for r in rows)


def test_fit_dispatch_measures_on_a_quiet_machine_only(tmp_path, monkeypatch):
    import fit_dispatch

    data = tmp_path / "d.json"
    argv = ["--measure", "--data", str(data), "--points", "0", "--cells", "rnn_tanh"]
    fake = {"train": {"fused": [1.0], "native": [1.0]}, "eval": {"fused": [1.0], "native": [1.0]}}
    monkeypatch.setattr(fit_dispatch, "measure_point", lambda *a: fake)  # nothing is timed
    _Machine(monkeypatch, load=2.0, spread=None)
    with pytest.raises(SystemExit, match="not quiet"):
        fit_dispatch.main(argv)
    assert not data.exists()
    # quiet before, but other processes busy during each point: no point is stored
    _Machine(monkeypatch, load=0.1, others=1.0, spread=None)
    fit_dispatch.main(argv)
    assert not data.exists() or json.loads(data.read_text())["points"] == []
    _Machine(monkeypatch, load=0.1, others=0.0, spread=None)
    fit_dispatch.main(argv)
    saved = json.loads(data.read_text())
    points = saved["points"]
    assert [tuple(p["size"]) for p in points] == fit_dispatch.BENCH_SIZES
    assert all(p["load"]["others_load"] == 0.0 for p in points)
    # timed under the steady allocator, recorded per maker; a resumed run under another setting is refused
    maker = fit_dispatch.point_maker(points[0])
    assert saved["meta"][maker]["allocator"]["name"] == "steady"
    with pytest.raises(SystemExit, match="timed under the `steady` allocator and this run would time under `default`"):
        fit_dispatch.main([*argv, "--allocator", "default"])


def test_memory_children_fix_glibcs_mmap_threshold(monkeypatch):
    """The memory children run with a fixed mmap threshold (so one process's high-water mark follows its live
    memory); a threshold the caller set is kept."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert bench_rnn.memory_env()["MALLOC_MMAP_THRESHOLD_"] == str(bench_rnn.MMAP_THRESHOLD)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert bench_rnn.memory_env()["MALLOC_MMAP_THRESHOLD_"] == "131072"


def test_a_size_whose_control_is_not_known_well_enough_gets_more_rounds(monkeypatch):
    seen = []

    def interval(ratios):  # the control's median is known to +-30% after 3 rounds, to +-5% after 6
        seen.append(len(ratios))
        return [0.7, 1.3] if len(ratios) < 6 else [0.95, 1.05]

    monkeypatch.setattr(bench_rnn, "aa_interval", interval)
    rows = bench_rnn.measure_time(["rnn"], [None], [TINY], 3, None, QUIET, bf16_cells=(), max_noise=0.1, retries=2)
    assert rows and set(seen) == {3, 6}  # the rounds were added to the first ones, not started again
    assert all(r["rounds"] == 6 and r["extended"] == [0.3, 0.05] for r in rows)
    text = bench_rnn.extended_text(rows)
    assert f"{TINY}: 6 rounds" in text and "30.0%, 5.0%" in text and "all of them" in text

    # never known well enough: the batches run out, and every batch's noise is named
    monkeypatch.setattr(bench_rnn, "aa_interval", lambda ratios: [0.7, 1.3])
    rows = bench_rnn.measure_time(["rnn"], [None], [TINY], 3, None, QUIET, bf16_cells=(), max_noise=0.1, retries=2)
    assert all(r["rounds"] == 9 and r["extended"] == [0.3, 0.3, 0.3] for r in rows)
    # known at once, or no more rounds asked for: one batch, and the page says nothing about it
    for noise, retries in ((0.05, 2), (0.3, 0)):
        monkeypatch.setattr(bench_rnn, "aa_interval", lambda ratios, n=noise: [1 - n, 1 + n])
        rows = bench_rnn.measure_time(["rnn"], [None], [TINY], 3, None, QUIET, bf16_cells=(), max_noise=0.1,
                                      retries=retries)
        assert all(r["rounds"] == 3 for r in rows) and not any("extended" in r for r in rows)
        assert bench_rnn.extended_text(rows) == ""


def test_retries_must_not_be_negative(capsys):
    with pytest.raises(SystemExit):
        bench_rnn.main(["--retries", "-1", "--no-memory"])
    assert "--retries: expected an int >= 0, got -1" in capsys.readouterr().err


def test_the_regression_check_compares_runs_with_the_same_threads_only():
    row = {"candidate": "LSTM layer", "size": [4, 2, 3, 5], "mode": "train", "norm": "layer", "ratio": 1.5}
    baseline = {"meta": {"when": "then", "rounds": 7, "threads": 2}, "rows": [dict(row, ratio=1.0)]}
    same = bench_rnn.regression([row], baseline, threads=2)
    assert "1 rows compared, 0 within 5%, 1 above" in same[0] and "| 1.50 |" in same[-1]
    other = bench_rnn.regression([row], baseline, threads=1)
    assert other == [bench_rnn.regression([row], baseline, threads=1)[0]] and "used 2 threads and this one 1" in other[0]
    assert "rows compared" in bench_rnn.regression([row], baseline)[0]  # threads unknown: compared, as before
    sections = bench_rnn.regression_sections([row], baseline, threads=1)
    assert "used 2 threads" in sections["main"][0]


def _noise_meta(noise=0.02, **extra):
    meta = _meta(spread=0.3, **extra)  # torch.nn's own spread is information only once there is a control
    meta["quiet"]["ratio_noise"] = None if noise == "none" else {
        "noise": noise, "candidate": "torch.nn.GRU", "size": [100, 64, 128, 256], "mode": "train"}
    return meta


def test_a_run_with_the_control_is_judged_by_the_noise_of_its_ratios():
    assert bench_rnn.not_quiet(_noise_meta()) == []
    why = bench_rnn.not_quiet(_noise_meta(noise=0.08))
    assert len(why) == 1 and "A/A control moved by 8%" in why[0] and "torch.nn.GRU" in why[0] and "(100, 64, 128, 256)" in why[0]
    assert bench_rnn.not_quiet(_noise_meta(noise=0.08), max_noise=0.1) == []
    assert "unknown" in bench_rnn.not_quiet(_noise_meta(noise=None))[0]
    assert "no A/A control" in bench_rnn.not_quiet(_noise_meta(noise="none"))[0]
    assert "load average 1.30" in bench_rnn.not_quiet(_noise_meta(load_before=1.3))[0]
    text = bench_rnn.quiet_text(_noise_meta())
    assert "moved by at most 30.0%" in text and "A/A control" in text and "at most 2.0%" in text
    # a run from before the control keeps its judgement by torch.nn's spread
    assert "moved by 30%" in bench_rnn.not_quiet(_meta(spread=0.3))[0] and "A/A" not in bench_rnn.quiet_text(_meta())


def test_the_memory_column_can_come_from_an_earlier_run(tmp_path, quiet_machine, monkeypatch):
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    earlier = tmp_path / "earlier.json"
    size = list(TINY)
    earlier.write_text(json.dumps({"meta": {"when": "2026-01-02", "threads": 1, "argv": "--threads 1", "memory_samples": 2},
                                   "memory_mib": {f"torch.nn.RNN {tuple(size)}": 2.0,
                                                  f"recnorm.RNN(norm=None) {tuple(size)}": 1.0}}))
    monkeypatch.setattr(bench_rnn, "measure_memory", lambda *a, **k: pytest.fail("measured memory"))
    _main(*_ARGS[:-4], "--no-compile", "--bf16-cells", "--no-variants", "--sizes", ",".join(map(str, TINY)),
          "--memory-from", earlier, "--json", js, "--out", md)
    data = json.loads(js.read_text())
    assert data["memory_mib"][f"recnorm.RNN(norm=None) {tuple(size)}"] == 1.0
    assert "2026-01-02" in data["meta"]["memory_remeasured"] and data["meta"]["memory_samples"] == 2
    page = md.read_text()
    assert "taken over with `--memory-from`" in page and "0.50" in page
    # taken over again from that run: the page still names the run that measured the column
    js2 = tmp_path / "c.json"
    _main(*_ARGS[:-4], "--no-compile", "--bf16-cells", "--no-variants", "--sizes", ",".join(map(str, TINY)),
          "--memory-from", js, "--json", js2, "--out", tmp_path / "c.md")
    again = json.loads(js2.read_text())["meta"]
    assert again["memory_remeasured"] == data["meta"]["memory_remeasured"] and again["memory_samples"] == 2
    # and from a run whose column a --memory-only run re-measured: the page names that re-measurement
    remeasured = "The peak memory of 2 candidates (rnn; 1 size) was re-measured on 2026-01-03 at commit abc1234."
    data["meta"]["memory_remeasured"] = remeasured
    js3, js4 = tmp_path / "d.json", tmp_path / "e.json"
    js3.write_text(json.dumps(data))
    _main(*_ARGS[:-4], "--no-compile", "--bf16-cells", "--no-variants", "--sizes", ",".join(map(str, TINY)),
          "--memory-from", js3, "--json", js4, "--out", tmp_path / "e.md")
    assert json.loads(js4.read_text())["meta"]["memory_remeasured"] == remeasured
    assert remeasured in (tmp_path / "e.md").read_text()


def test_a_figure_is_judged_by_the_interval_of_its_median():
    assert bench_rnn.judge(0.95, [0.90, 0.99], 1.0) == "met"
    assert bench_rnn.judge(0.99, [0.97, 1.03], 1.0) == "open"  # the interval contains the target: cannot tell
    assert bench_rnn.judge(1.10, [1.02, 1.20], 1.0) == "missed"
    assert bench_rnn.judge(1.01, None, 1.0) == "missed" and bench_rnn.judge(1.0, None, 1.0) == "met"  # no interval

    def row(size, mode, ratio, ci, bf16=False, to_fp32=1.0, to_fp32_ci=None):
        label = "recnorm.LSTM(norm='layer')" + (bench_rnn.BF16 if bf16 else "")
        return {"size": list(size), "cell": "lstm", "candidate": label, "norm": "layer", "bf16": bf16, "mode": mode,
                "ratio": ratio, "ratio_ci": ci, "ratio_to_fp32": to_fp32, "ratio_to_fp32_ci": to_fp32_ci}

    rows = [row((1, 1, 1, 1), "train", 0.80, [0.78, 0.85]), row((2, 2, 2, 2), "train", 0.88, [0.85, 0.93]),
            row((1, 1, 1, 1), "eval", 0.90, [0.88, 0.95]), row((2, 2, 2, 2), "eval", 1.08, [1.03, 1.12]),
            row((1, 1, 1, 1), "train", 1.2, None, True, 1.04, [1.01, 1.045]),
            row((1, 1, 1, 1), "eval", 1.2, None, True, 1.04, [1.02, 1.07])]
    summ = bench_rnn.summary(rows, {})["recnorm.LSTM(norm='layer')"]
    # the worst median over sizes, and the worst judgement over sizes
    assert summ["train"] == 0.88 and summ["train_status"] == "open"
    assert summ["eval"] == 1.08 and summ["eval_status"] == "missed"
    assert summ["bf16_train_status"] == "met" and summ["bf16_eval_status"] == "open"  # against 1.05
    # the worst size's interval beside its median
    line = bench_rnn.summary_table({"L": summ})[2]
    assert line == "| L | 0.88† [0.85, 0.93] | **1.08** [1.03, 1.12] | – | 1.04 [1.01, 1.04] | 1.04† [1.02, 1.07] |"
    assert "(≤ 1.05)" in bench_rnn.summary_table({"L": summ})[0]
    # unjudged: plain figures, the intervals kept
    assert "| 0.88 [0.85, 0.93] | 1.08 [1.03, 1.12] |" in bench_rnn.summary_table({"L": summ}, verdict=False)[2]


def test_a_run_whose_control_is_not_known_well_enough_gets_no_verdict():
    meta = _noise_meta()
    meta["quiet"]["ratio_noise"] = {"noise": 0.08, "interval": [0.97, 1.08], "measure": "interval",
                                    "candidate": "torch.nn.GRU", "size": [100, 64, 128, 256], "mode": "eval"}
    why = bench_rnn.not_quiet(meta)
    assert len(why) == 1 and "[0.970, 1.080]" in why[0] and "known to 8% only" in why[0] and "torch.nn.GRU" in why[0]
    assert bench_rnn.not_quiet(meta, max_noise=0.1) == []
    text = bench_rnn.quiet_text(meta)
    assert "within 8.0% of 1" in text and "[0.970, 1.080]" in text
    meta["quiet"]["ratio_noise"] = {"noise": None, "measure": "interval"}
    assert "fewer than 6 rounds" in bench_rnn.not_quiet(meta)[0] and "unknown" in bench_rnn.quiet_text(meta)


def test_each_candidate_is_timed_back_to_back_with_its_baseline(monkeypatch):
    """A round times groups (baseline, candidate; a bfloat16 row with its float32 twin too), each group's
    members one after the other, so that a ratio is taken between timings that are next to each other."""

    class Fake:
        def __init__(self, label):
            self.label = label

        def train(self, mode=True):
            return self

    seq = []
    monkeypatch.setattr(bench_rnn, "_steps", lambda model, x, bf16: (lambda: seq.append(model.label),) * 2)
    cands = bench_rnn._candidates(["lstm"], [None, "layer"], bf16_cells=("lstm",), peers=False)
    built = {c.label: (Fake(c.label), None, c.bf16, {"train": 1, "eval": 1}) for c in cands}
    groups = bench_rnn._groups(cands, built)
    base, bf = "torch.nn.LSTM", "recnorm.LSTM(norm='layer')" + bench_rnn.BF16
    assert groups["recnorm.LSTM(norm='layer')"] == [base, "recnorm.LSTM(norm='layer')"]
    assert groups[bf] == [base, "recnorm.LSTM(norm='layer')", bf]  # with its float32 twin
    assert groups["torch.nn.LSTM" + bench_rnn.CONTROL] == [base, "torch.nn.LSTM" + bench_rnn.CONTROL]
    assert base not in groups  # the baseline is timed in every group, never alone
    times = bench_rnn._rounds(built, groups, 4, TINY, QUIET)
    assert times.rounds == 4 and len(seq) == 2 * 4 * sum(len(g) for g in groups.values())
    # the sequence is the groups one after another, each group's members together
    i, firsts = 0, []
    for r in range(4):
        for mode in ("train", "eval"):
            for label in bench_rnn._order(list(groups), TINY, r, mode):
                members = seq[i: i + len(groups[label])]
                assert sorted(members) == sorted(groups[label])
                firsts.append(members[0])
                i += len(members)
    assert len(set(firsts)) > 1  # the baseline does not always go first
    # ratios come from within each group; the baseline's own times (its first in each round) give its milliseconds
    assert len(times.ratios("recnorm.LSTM(norm=None)", base, "train")) == 4
    assert times.ratios(base, base, "eval") == [1.0] * 4 and len(times.own[(base, "eval")]) == 4


def test_the_page_names_the_cpu_model_or_says_it_was_not_recorded():
    meta = {"machine": "x86_64, 2 CPUs"}
    assert bench_rnn.machine_text(meta) == "x86_64, 2 CPUs (CPU model not recorded)"
    assert bench_rnn.machine_text({**meta, "cpu": "AMD EPYC 9B14"}) == "x86_64, 2 CPUs, AMD EPYC 9B14"
    names = []
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    assert bench_rnn.cpu_model() == (names[0] if names else bench_rnn.platform.processor() or "")


def test_the_dispatch_table_shows_the_rule_of_the_runs_cpu_maker():
    from recnorm.kernels import autotune

    def rows(cpu):
        return {line.split(" | ")[0].strip("| "): line for line in bench_rnn.dispatch_lines(bench_rnn.SIZES, cpu)
                if line.startswith("| ") and "/" in line.split(" | ")[0] and not line.startswith("| cell")}  # fmt: skip

    for cpu, maker in ((None, "AMD"), ("AMD EPYC 9B14", "AMD"), ("Intel(R) Xeon(R) Processor @ 2.80GHz", "Intel")):
        lines = bench_rnn.dispatch_lines(bench_rnn.SIZES, cpu)
        assert f"the {maker} rule" in lines[0]  # a run without a CPU record was made on the AMD host
        table = rows(cpu)
        assert set(table) == {k.rsplit("/", 1)[0].replace("/", " / ") for k in autotune.RULES[maker]["rules"]}
        entry = autotune.RULES[maker]["rules"]["lstm/eval/float32"]
        assert f"| {entry['points']} |" in table["lstm / eval"]  # that maker's fit, not this host's
        for key, rule_entry in autotune.RULES[maker]["rules"].items():  # each size's pick is that maker's rule's
            cell, phase, dtype = key.split("/")
            picks = [part.split("→")[1].strip(" |") for part in table[f"{cell} / {phase}"].split(" | ") if "→" in part]
            want = ["fused" if autotune.predict(cell, phase == "train", dtype, *size, rule=autotune.RULES[maker]) < 0
                    else "torch" for size in bench_rnn.SIZES]  # fmt: skip
            assert picks == want, (maker, key)
    # the makers' rules disagree on the LSTM's training at (28, 128, 28, 128), and each row says so
    assert rows(None)["lstm / train"] != rows("Intel Xeon")["lstm / train"]
    assert bench_rnn.dispatch_lines(bench_rnn.SIZES, "Apple M2") == [
        "No dispatch rule was measured on Apple M2 CPUs: torch's op runs wherever it serves the case."]


def test_the_steady_allocator_is_set_in_the_process_and_stops_the_page_faults():
    """In a child process (mallopt holds for the rest of a process): ``steady`` sets glibc's mallopt values
    and records them, and torch.nn.LSTM's training step at the benchmark's (784, 64, 1, 128) then takes a
    small fraction of the page faults it takes under glibc's default, where its op maps its large buffers
    afresh on every call (115,000 against 1,300 per step on the AMD host)."""
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import json, sys, torch
        sys.path.insert(0, sys.argv[1])
        import allocator
        record = allocator.set_allocator(sys.argv[2])
        torch.set_num_threads(1)
        lstm, x = torch.nn.LSTM(1, 128), torch.randn(784, 64, 1)
        def step():
            lstm.zero_grad(set_to_none=True)
            lstm(x)[0].sum().backward()
        for _ in range(3):  # warm-up: the heap grows to the step's peak (bench_rnn warms up so too)
            step()
        before = allocator.minor_faults()
        for _ in range(2):
            step()
        print(json.dumps({"record": record, "faults": (allocator.minor_faults() - before) / 2}))
    """)
    out = {}
    for name in ("default", "steady"):
        res = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "benchmarks"), name],
                             capture_output=True, text=True, check=True)
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["steady"]["record"] == {"name": "steady", "mallopt": {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1}}
    assert out["default"]["record"] == {"name": "default", "mallopt": {}}
    assert out["default"]["faults"] > 10_000 and out["steady"]["faults"] < out["default"]["faults"] / 10, out
    with pytest.raises(ValueError, match="expected one of steady, default, got 'fast'"):
        REAL_SET_ALLOCATOR("fast")  # refused before any mallopt


def test_a_run_records_its_allocator_and_page_faults_and_default_gets_no_verdict(tmp_path, quiet_machine, _allocator_recorded_not_set):
    """The run records the setting it timed under and every row its minor page faults per call; the page and
    README say which allocator; a run under glibc's default gives no verdict (torch.nn's time then includes
    page faults recnorm's pooled kernels do not pay), and the regression check does not compare runs timed
    under different settings."""
    common = ["--sizes", ",".join(map(str, TINY)), "--rounds", "3", "--norms", "None", "--cells", "rnn", "--bf16-cells",
              "--no-compile", "--no-memory", "--no-variants", "--min-time", "0"]
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{bench_rnn.README_BEGIN}\nold\n{bench_rnn.README_END}\n")
    _main(*common, "--json", tmp_path / "steady.json", "--out", tmp_path / "steady.md", "--readme", readme)
    assert _allocator_recorded_not_set == ["steady"]
    data = json.loads((tmp_path / "steady.json").read_text())
    assert data["meta"]["allocator"] == {"name": "steady", "mallopt": allocator.STEADY}
    assert all(isinstance(r["faults"], float) and r["faults"] >= 0 for r in data["rows"])
    page = (tmp_path / "steady.md").read_text()
    assert "**Allocator.** glibc's malloc held steady" in page and "Minor page faults per call in this run" in page
    assert "malloc held steady" in readme.read_text()
    _main(*common, "--allocator", "default", "--json", tmp_path / "default.json", "--out", tmp_path / "default.md",
          "--readme", readme, "--baseline", tmp_path / "steady.json", rc=2)
    page = (tmp_path / "default.md").read_text()
    assert "glibc's default malloc (`--allocator default`)" in page
    assert "torch.nn's time includes the page faults" in page  # the reason for no verdict
    assert "timed under the `steady` allocator and this one under `default`" in page
    with pytest.raises(SystemExit):
        bench_rnn.main([*common, "--allocator", "fast"])


def test_a_run_from_before_the_setting_says_glibcs_default_ran():
    assert allocator.describe(None).startswith("Not recorded: the run predates `--allocator` and ran glibc's default malloc")
    assert allocator.recorded({}) == "default" and allocator.recorded({"allocator": None}) == "default"
    assert allocator.recorded({"allocator": {"name": "steady", "mallopt": {}}}) == "steady"
    assert bench_rnn.worst_faults([{"norm": "torch", "candidate": "torch.nn.RNN", "size": [1, 1, 1, 1], "mode": "train"}]) is None

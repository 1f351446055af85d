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

import bench_rnn  # noqa: E402

TINY = (3, 2, 3, 4)
QUIET = lambda msg: None  # noqa: E731


@pytest.fixture(autouse=True)
def _clean_failed():
    bench_rnn.FAILED.clear()
    yield
    bench_rnn.FAILED.clear()


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


def _main(*argv):
    assert bench_rnn.main([str(a) for a in argv]) == 0


def test_only_variants_merges_into_an_existing_json_and_renders(tmp_path, capsys):
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


def _section(page: str, start: str, end: str) -> str:
    return page.split(start, 1)[1].split(end, 1)[0]


def test_render_of_the_committed_json_keeps_its_tables(tmp_path):
    # the committed page and JSON come from one run: rendering the JSON again gives the same main tables
    out = tmp_path / "b.md"
    _main("--render", os.path.join(ROOT, "docs", "benchmarks.json"), "--out", out)
    with open(os.path.join(ROOT, "docs", "benchmarks.md")) as f:
        committed = f.read()
    page = out.read_text()
    for start, end in (("## Against the targets of issue 11", "## Every size"), ("## Every size, float32", "## What")):
        assert _section(page, start, end) == _section(committed, start, end)
    assert "## Variants (issue 8)" in page


def test_memory_child_builds_a_variant():
    c = bench_rnn.Candidate("v", "lstm", None, variant="between_layers='batch', 2 layers", section="variants")
    mib = bench_rnn.memory_of(c, TINY, threads=1)
    assert mib is not None and mib >= 0

"""Committed runs reproduce: a re-run of a run's config on the kernels it recorded gives its final metrics.

One committed run per norm is re-run from its published record (``read_config``, which is what
``recnorm train --config results/<study>/runs.jsonl#RUN_ID`` reads) and its final metrics are compared to
1e-6:

* five runs of ``results/default`` (the main study: LSTM on row-wise Fashion-MNIST, 200 steps; no norm,
  per-step BN, layer norm, sequence-wise BN, shared BN). They were made before the fitted dispatch rule, and
  their migrated config carries ``kernel="legacy"``; with ``kernel="auto"`` today the no-norm and
  sequence-wise BN runs train on the fused kernel and end 0.01-0.03 away (issue 18);
* three smoke runs made by the current code (``data/runs.jsonl``: RMS norm, which has no small committed
  run, no norm and layer norm), whose records carry the per-layer pin of the kernels that ran
  (``provenance.kernel_pin``, e.g. ``l0.train=fused,l0.eval=native``).

All were made on a CPU whose torch kernels ran AVX2 code; the re-runs cap the ISA to it (``replay_env`` /
``cpu.isa_env`` of each record, set before torch loads, hence a subprocess), so they also reproduce on an
AVX-512 machine. A CPU without AVX2 skips.

The ISA cap does not make two CPU makers' GEMMs round alike: MKL picks its code paths and blocking by the
processor, and a training run amplifies the difference (the runs below, made on an AMD EPYC, ended 0.004-0.012
away in accuracy on an Intel Xeon, Ice Lake, with the same kernels; ``MKL_CBWR`` set to ``AVX2`` or
``COMPATIBLE`` moved them but matched neither). So each CPU maker has its own smoke runs of the same
configs (``data/runs.jsonl`` from an AMD EPYC, ``data/runs_intel.jsonl`` from an Intel Xeon), and a host
replays those of its maker; the legacy runs, made on an AMD EPYC, replay on AMD hosts only. Another maker's
host skips, naming both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from recnorm.experiments.results import load_records, read_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPORT = os.path.join(ROOT, "results", "default", "runs.jsonl")
SMOKE = {"AMD": os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "runs.jsonl"),
         "Intel": os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "runs_intel.jsonl")}
#: The CPU maker of the host that made the legacy runs of ``results/default`` (they predate the CPU record;
#: they replayed there, to 1e-6, and on the AMD EPYC hosts of CI).
LEGACY_MAKER = "AMD"
COMMITTED = ["fashion_rows-lstm-none-orthogonal1-s3-ec542f982e", "fashion_rows-lstm-batch-orthogonal1-s0-43c0415d3b",
             "fashion_rows-lstm-layer-orthogonal4-s3-d155528ed5",
             "fashion_rows-lstm-sequence_batch-orthogonal4-s4-06f8a7f905",
             "fashion_rows-lstm-shared_batch-orthogonal4-s1-342dcf6510"]
TOLERANCE = 1e-6

_RERUN = """
import json, sys, tempfile
from recnorm.experiments.config import RunConfig
from recnorm.experiments.results import read_config
from recnorm.experiments.train import train_and_evaluate
out = {}
for ref in sys.argv[1:]:
    with tempfile.TemporaryDirectory() as workdir:
        result = train_and_evaluate(RunConfig.from_dict(read_config(ref)), workdir)
    out[ref] = {"final": {k: result.final[k] for k in ("valid", "test")}, "kernels": result.provenance["kernels"]}
print(json.dumps(out))
"""


def _fashion_available() -> bool:
    from recnorm.experiments.tasks.fashion_mnist import FASHION_MNIST_DIR

    return os.path.isdir(FASHION_MNIST_DIR)


def _rerun(refs, env_caps):
    env = {**os.environ, **env_caps, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "src"),
                                                                    os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _RERUN, *refs], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_same_final(record, rerun):
    for split in ("valid", "test"):
        for name, value in record["final"][split].items():
            again = rerun["final"][split][name]
            assert again == pytest.approx(value, abs=TOLERANCE), (record["run_id"], split, name, again, value)


def _needs_avx2():
    import torch

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip(f"the committed runs were made with AVX2 kernels; this CPU runs "
                    f"{torch.backends.cpu.get_cpu_capability()}")
    if not _fashion_available():
        pytest.skip("needs Fashion-MNIST: apt-get install dataset-fashion-mnist")


def _maker(model) -> str:
    """The CPU maker in a model name ("AMD EPYC 9B14" -> "AMD"), or the name itself."""
    from recnorm.kernels.host import maker_of

    model = model or "unknown CPU"
    return maker_of(model) or model


def _host_maker() -> str:
    from recnorm.experiments.provenance import cpu

    return _maker(cpu()["model"])


def _needs_maker(makers, what: str) -> str:
    """The host's CPU maker, which must be one of ``makers`` (those whose CPUs made ``what``); else a skip."""
    host = _host_maker()
    if host not in makers:
        pytest.skip(f"{what} were made on {' and '.join(makers)} CPUs only and this host is {host}: another maker's "
                    "GEMMs round differently even with the ISA capped, so a training run does not replay to 1e-6")
    return host


def test_each_cpu_makers_smoke_runs_are_the_same_configs_made_there():
    ids = None
    for maker, path in SMOKE.items():
        records = load_records(path)
        assert {_maker(r["provenance"]["cpu"]["model"]) for r in records} == {maker}
        assert ids is None or [r["run_id"] for r in records] == ids  # the run id is the config's hash
        ids = [r["run_id"] for r in records]
    assert _maker("AMD EPYC") == "AMD" and _maker("Intel(R) Xeon(R) Processor @ 2.80GHz") == "Intel"


def test_the_committed_run_of_every_norm_reproduces_on_its_legacy_kernels():
    _needs_avx2()
    _needs_maker([LEGACY_MAKER], "the legacy runs of results/default")
    records = {r["run_id"]: r for r in load_records(REPORT) if r["run_id"] in COMMITTED}
    assert sorted(records) == sorted(COMMITTED)
    assert {r["config"]["norm"] for r in records.values()} == {None, "batch", "layer", "sequence_batch",
                                                                "shared_batch"}
    for record in records.values():
        assert record["config"]["kernel"] == "legacy"
    caps = next(iter(records.values()))["provenance"]["replay_env"]
    reruns = _rerun([f"{REPORT}#{run_id}" for run_id in COMMITTED], caps)
    for run_id in COMMITTED:
        _assert_same_final(records[run_id], reruns[f"{REPORT}#{run_id}"])


def test_runs_of_the_current_code_reproduce_on_the_kernels_they_recorded():
    _needs_avx2()
    path = SMOKE[_needs_maker(list(SMOKE), "the smoke runs")]
    records = load_records(path)
    assert {r["config"]["norm"] for r in records} == {"rms", None, "layer"}
    refs = []
    for record in records:
        assert record["config"]["kernel"] == "auto"
        pin = record["provenance"]["kernel_pin"]
        assert pin and read_config(f"{path}#{record['run_id']}")["kernel"] == pin
        refs.append(f"{path}#{record['run_id']}")
    reruns = _rerun(refs, records[0]["provenance"]["cpu"]["isa_env"])
    for record, ref in zip(records, refs):
        _assert_same_final(record, reruns[ref])
        assert reruns[ref]["kernels"] == record["provenance"]["kernels"]


#: A committed study run made on an AMD EPYC with torch's kernels on AVX-512 (no ISA cap), before the fused LSTM got its
#: AVX-512 build on AMD CPUs (2d425ab): its LSTM trained on the AVX2 build, which ``RECNORM_FUSED_AVX512=0`` selects.
UNCAPPED_AMD = f"{os.path.join(ROOT, 'results', 'shared_bn', 'runs.jsonl')}#fashion_rows-lstm-shared_batch-default1-s9-3dc43f57e3"


def test_an_amd_run_from_before_the_lstm_avx512_build_replays_with_that_build_switched_off():
    """What docs/guide.md tells a user who replays such a run: without the override the fused LSTM rounds as the
    AVX-512 build does and the run ends elsewhere (0.764 -> 0.765 valid accuracy with the EMA statistics, measured
    when the default changed); with it the run's final metrics come back to 1e-6."""
    import torch

    _needs_avx2()
    _needs_maker(["AMD"], "the uncapped AMD study runs")
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this run was made with torch's kernels on AVX-512; this CPU runs "
                    f"{torch.backends.cpu.get_cpu_capability()}")
    path, run_id = UNCAPPED_AMD.split("#")
    record = next(r for r in load_records(path) if r["run_id"] == run_id)
    assert record["provenance"]["cpu"] == {"model": "AMD EPYC", "capability": "AVX512", "isa_env": {}}
    assert "build" not in (record["provenance"].get("gemm") or {})
    assert record["provenance"]["kernels"]["l0"]["train"] == ["fused"]
    rerun = _rerun([UNCAPPED_AMD], {"RECNORM_FUSED_AVX512": "0"})[UNCAPPED_AMD]
    _assert_same_final(record, rerun)
    assert rerun["kernels"] == record["provenance"]["kernels"]

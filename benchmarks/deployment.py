"""Every PyTorch deployment tool on every registered cell x norm and on the variants (joint gate norm,
carried cell, one-group GRU norm, zoneout, DropConnect, BN between layers), and the error each reaches:
writes docs/deployment.md.

    python benchmarks/deployment.py                 # all cells x norms, then the variants (about 15-25 minutes on 2 cores)
    python benchmarks/deployment.py --cells lstm --norms layer batch --variants --out /tmp/deployment.md

For each case a 2-layer layer (input 4, hidden 6) is trained for two steps (so batch norms have running
statistics), then put through:

* ``torch.jit.trace`` on a (5, 3, 4) input, then run on (9, 7, 4) and (2, 2, 4);
* ``torch.compile(fullgraph=True)`` (inductor) in eval and in training mode: outputs and input gradients
  (with inductor's ``fallback_random``, so that zoneout and DropConnect draw the masks eager draws);
* ``torch.compile(dynamic=True)`` on 10 packed batches of 10 different lengths: how many compilations;
* ``torch.export.export`` with dynamic T and B, eval mode, run on other shapes;
* ``torch.onnx.export(dynamo=True)`` with dynamic T and B, run in onnxruntime on other shapes;
* ``torch.jit.script``: the error it raises.

The error is the largest absolute difference from eager over the checked shapes. Nothing is printed by
the library; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import platform
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.nn.utils.rnn import pack_padded_sequence

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from registry_cases import cell_variants, make  # noqa: E402

import recnorm  # noqa: E402

I, H = 4, 6
SHAPES = [(9, 7, I), (2, 2, I)]

#: The variants of issue 8, each a cell id and the layer's keyword arguments.
VARIANTS: Dict[str, Tuple[str, Dict]] = {
    "layer, joint+carry, zoneout (0.2, 0.1)": ("lstm", dict(norm="layer", norm_kwargs={"joint": True, "carry_cell": True}, zoneout=(0.2, 0.1))),
    "rms, weight_dropout 0.3": ("lstm", dict(norm="rms", weight_dropout=0.3)),
    "between_layers='batch'": ("lstm", dict(norm=None, between_layers="batch")),
    "layer, one group, zoneout 0.2": ("gru", dict(norm="layer", norm_kwargs={"gate_groups": "one"}, zoneout=0.2)),
    "batch, zoneout 0.2, weight_dropout 0.3": ("gru", dict(norm="batch", zoneout=0.2, weight_dropout=0.3)),
    "rms, joint, zoneout 0.2": ("rnn_tanh", dict(norm="rms", norm_kwargs={"joint": True}, zoneout=0.2)),
    "layer, joint, zoneout 0.2": ("rnn_relu", dict(norm="layer", norm_kwargs={"joint": True}, zoneout=0.2)),
}


def _trained(cell: str, kw: Dict) -> torch.nn.Module:
    torch.manual_seed(0)
    m = make(cell, I, H, 2, **kw)
    opt = torch.optim.SGD(m.parameters(), 0.1)
    for _ in range(2):
        out, _ = m(torch.randn(5, 3, I))
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
    return m.eval()


def _max_err(fn: Callable, m: torch.nn.Module) -> float:
    err = 0.0
    for shape in SHAPES:
        x = torch.randn(*shape)
        with torch.no_grad():
            err = max(err, float((fn(x) - m(x)[0]).abs().max()))
    return err


def _dims():
    return ({0: torch.export.Dim("T", min=2, max=4096), 1: torch.export.Dim("B", min=2, max=4096)},)


def tool_trace(cell, kw):
    m = _trained(cell, kw)
    traced = torch.jit.trace(m, (torch.randn(5, 3, I),), check_trace=False)
    return "ok", _max_err(lambda x: traced(x)[0], m)


def tool_compile(cell, kw):
    errs = []
    for train in (False, True):
        m = _trained(cell, kw)
        twin = make(cell, I, H, 2, **kw)
        twin.load_state_dict(m.state_dict())
        m.train(train)
        twin.train(train)
        torch._dynamo.reset()
        compiled = torch.compile(m, fullgraph=True)
        x = torch.randn(7, 5, I)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        with torch._inductor.config.patch(fallback_random=True):
            torch.manual_seed(1)
            a = compiled(xa)[0]
        torch.manual_seed(1)
        b = twin(xb)[0]
        a.sum().backward()
        b.sum().backward()
        errs.append(max(float((a - b).abs().max()), float((xa.grad - xb.grad).abs().max())))
    return "ok (fullgraph, eval and training)", max(errs)


def tool_compile_dynamic(cell, kw):
    torch.manual_seed(0)
    m = make(cell, I, H, 2, **kw)
    count = []

    def backend(gm, example_inputs):
        count.append(1)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(m, dynamic=True, backend=backend)
    for step in range(10):
        T = 3 + step
        lengths = torch.randint(1, T + 1, (6,))
        lengths[0] = T
        out, _ = compiled(pack_padded_sequence(torch.randn(T, 6, I), lengths, enforce_sorted=False))
        out.data.sum().backward()
    return f"{len(count)} compilation(s) for 10 lengths", None


def tool_export(cell, kw):
    m = _trained(cell, kw)
    ep = torch.export.export(m, (torch.randn(5, 3, I),), dynamic_shapes=_dims())
    return "ok (dynamic T, B)", _max_err(lambda x: ep.module()(x)[0], m)


def tool_onnx(cell, kw):
    import onnx
    import onnxruntime as ort

    m = _trained(cell, kw)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        with contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(m, (torch.randn(5, 3, I),), dynamic_shapes=_dims(), dynamo=True, verbose=False)
        program.save(path)
        model = onnx.load(path)
        loops = sorted({n.op_type for n in model.graph.node} & {"Scan", "Loop", "LSTM", "GRU", "RNN"})
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        err = _max_err(lambda x: torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]), m)
    return f"ok ({', '.join(loops)}; onnxruntime {ort.__version__})", err


def tool_script(cell, kw):
    m = make(cell, I, H, 2, **kw)
    try:
        torch.jit.script(m)
    except RuntimeError as exc:
        text = str(exc).splitlines()[0]
        return "refused: " + (text[:90] + "..." if len(text) > 90 else text), None
    return "scripted (unexpected)", None


TOOLS: Dict[str, Callable] = {
    "torch.jit.trace": tool_trace,
    "torch.compile": tool_compile,
    "torch.compile, packed, dynamic": tool_compile_dynamic,
    "torch.export": tool_export,
    "torch.onnx.export": tool_onnx,
    "torch.jit.script": tool_script,
}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", nargs="+", default=list(cell_variants()))
    ap.add_argument("--norms", nargs="+", default=["none"] + recnorm.list_norms())
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS))
    ap.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS),
                    help="variants to run (default: all; the flag alone: none)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "deployment.md"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    rows: List[Tuple[str, str, str, str, str]] = []
    started = time.time()
    cases = [(cell, n, {"norm": None if n == "none" else n}) for cell in args.cells for n in args.norms]
    variants = list(VARIANTS) if args.variants is None else args.variants
    cases += [(VARIANTS[v][0], v, VARIANTS[v][1]) for v in variants]
    for cell, config, kw in cases:
        for tool in args.tools:
            t0 = time.time()
            try:
                status, err = TOOLS[tool](cell, kw)
            except Exception as exc:  # a failure is a result: it goes in the table
                status, err = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}", None
            rows.append((cell, config, tool, status, "" if err is None else f"{err:.1e}"))
            print(f"{cell:9s} {config[:30]:30s} {tool:32s} {status[:60]:60s} {rows[-1][4]:8s} {time.time() - t0:5.1f} s", file=sys.stderr)
    lines = [
        "# Deployment: every tool on every cell x norm, and on the variants",
        "",
        f"Produced by `python benchmarks/deployment.py` on {datetime.date.today().isoformat()} "
        f"(torch {torch.__version__}, recnorm {recnorm.__version__}, Python {platform.python_version()}, {platform.machine()}; "
        f"{(time.time() - started) / 60:.0f} minutes). A 2-layer layer (input 4, hidden 6) after two training steps; "
        "the error is the largest absolute difference from eager (float32) on inputs of shapes other than the one "
        "traced or exported, (9, 7, 4) and (2, 2, 4). How each tool is served is in README's Deployment section. "
        "The norm column names the norm, or a variant of issue 8 (its arguments: `VARIANTS` in the script); in "
        "training, the compiled variants draw their zoneout and DropConnect masks as eager does (inductor's "
        "`fallback_random`, seeded alike).",
        "",
        "| cell | norm | tool | result | max abs error |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {c} | {n} | {t} | {s} | {e} |" for c, n, t, s, e in rows]
    failed = [r for r in rows if r[3].startswith("FAILED")]
    lines += ["", f"{len(rows) - len(failed)} of {len(rows)} cases as expected." + (f" {len(failed)} failed." if failed else ""), ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""recnorm.convert: haste's and torchaudio's layers, loaded from peer-shaped state_dicts.

The references below are the peers' equations as their documentation states them, written here as small
step functions (no peer code):

* haste (docs/pytorch/haste_pytorch/*.md): ``kernel`` (input, G*H), ``recurrent_kernel`` (H, G*H), gate
  layouts i,g,f,o (LSTM) and z,r,g (GRU, the variant of 1406.1078v1 that applies the reset gate after the
  recurrent product, with a separate ``recurrent_bias``); LayerNormLSTM normalizes the input and
  recurrent activations (gains ``gamma[0]``, ``gamma[1]``) and the cell inside the output tanh
  (``gamma_h``, ``beta_h``); LayerNormGRU the input and recurrent activations. Layer norms use eps 1e-5.
* torchaudio ``_CustomLSTM`` (its docstring and the issue): ``gates = g_norm(x2g(x) + p2g(h))``, gate
  order i, f, g, o, ``c = c_norm(f c + i g)`` carried, ``h = o tanh(c)``; without layer norm both norms
  are the identity and x2g has a bias.
"""

from __future__ import annotations

import pytest
import torch

import recnorm
from recnorm import convert

DT = torch.float64
T, B, I, H = 5, 3, 4, 6


def _ln(v, gamma, beta=0.0, eps=1e-5):
    m = v.mean(-1, keepdim=True)
    var = ((v - m) ** 2).mean(-1, keepdim=True)
    return (v - m) / torch.sqrt(var + eps) * gamma + beta


def _haste_state_dict(kind, g):
    G = 4 if "LSTM" in kind else 3
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT) * 0.5  # noqa: E731
    sd = {"kernel": r(I, G * H), "recurrent_kernel": r(H, G * H), "bias": r(G * H)}
    if G == 3:
        sd["recurrent_bias"] = r(G * H)
    if kind.startswith("LayerNorm"):
        sd["gamma"] = torch.rand(2, G * H, generator=g, dtype=DT) + 0.5
        if G == 4:
            sd["gamma_h"] = torch.rand(H, generator=g, dtype=DT) + 0.5
            sd["beta_h"] = r(H)
    return sd


def _haste_reference(kind, sd, x, h, c=None):
    """haste's layer, one step at a time, from its documented equations."""
    ln = kind.startswith("LayerNorm")
    outs = []
    for t in range(x.shape[0]):
        wx, rh = x[t] @ sd["kernel"], h @ sd["recurrent_kernel"]
        if ln:
            wx, rh = _ln(wx, sd["gamma"][0]), _ln(rh, sd["gamma"][1])
        if "LSTM" in kind:
            i, g, f, o = (wx + rh + sd["bias"]).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            cc = _ln(c, sd["gamma_h"], sd["beta_h"]) if ln else c
            h = torch.sigmoid(o) * torch.tanh(cc)
        else:
            xz, xr, xg = (wx + sd["bias"]).chunk(3, -1)
            hz, hr, hg = (rh + sd["recurrent_bias"]).chunk(3, -1)
            z, r = torch.sigmoid(xz + hz), torch.sigmoid(xr + hr)
            g = torch.tanh(xg + r * hg)
            h = z * h + (1 - z) * g
        outs.append(h)
    return torch.stack(outs), h, c



def _assert_same_state_dict(back, sd):
    """A converter's round trip gives the peer's state_dict back: the same keys, the same values."""
    assert set(back) == set(sd)
    for k in sd:
        torch.testing.assert_close(back[k], sd[k], rtol=0, atol=1e-15)

@pytest.mark.parametrize("kind", ["LSTM", "LayerNormLSTM", "GRU", "LayerNormGRU"])
def test_from_haste_computes_hastes_function(kind):
    g = torch.Generator().manual_seed(0)
    sd = _haste_state_dict(kind, g)
    layer = convert.from_haste(sd).eval()
    assert isinstance(layer, recnorm.LSTM if "LSTM" in kind else recnorm.GRU)
    x = torch.randn(T, B, I, generator=g, dtype=DT)
    h0 = torch.randn(B, H, generator=g, dtype=DT)
    c0 = torch.randn(B, H, generator=g, dtype=DT)
    ref_out, ref_h, ref_c = _haste_reference(kind, sd, x, h0, c0)
    for kernel in ["reference", "fused"]:  # the fused GRU kernel serves haste's one group over 3H too
        layer.kernel = kernel
        if "LSTM" in kind:
            out, (h, c) = layer(x, (h0[None], c0[None]))
            torch.testing.assert_close(c[0], ref_c, rtol=1e-10, atol=1e-10)
        else:
            out, h = layer(x, h0[None])
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h[0], ref_h, rtol=1e-10, atol=1e-10)
    back = convert.to_haste(layer)
    _assert_same_state_dict(back, sd)


def test_haste_options_and_refusals():
    g = torch.Generator().manual_seed(1)
    sd = _haste_state_dict("LayerNormLSTM", g)
    layer = convert.from_haste(sd, zoneout=0.1, dropout=0.2, batch_first=True)
    assert layer.batch_first and layer._zoneout_rates == (0.1,) and layer.weight_dropout == 0.2
    with pytest.raises(ValueError, match="IndRNN"):
        convert.from_haste({"kernel": sd["kernel"], "recurrent_scale": torch.ones(H), "bias": torch.zeros(H)})
    with pytest.raises(ValueError, match="keys"):
        convert.from_haste({k: v for k, v in sd.items() if k != "beta_h"})
    with pytest.raises(ValueError, match="layer norm only"):
        convert.to_haste(recnorm.LSTM(I, H, norm="rms"))
    with pytest.raises(ValueError, match="joint"):
        convert.to_haste(recnorm.LSTM(I, H, norm="layer", norm_kwargs={"joint": True}))
    with pytest.raises(ValueError, match="num_layers=2"):
        convert.to_haste(recnorm.LSTM(I, H, num_layers=2))


def _torchaudio_state_dict(layer_norm, g):
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT) * 0.5  # noqa: E731
    sd = {"x2g.weight": r(4 * H, I), "p2g.weight": r(4 * H, H)}
    if layer_norm:
        sd.update({"g_norm.weight": torch.rand(4 * H, generator=g, dtype=DT) + 0.5, "g_norm.bias": r(4 * H),
                   "c_norm.weight": torch.rand(H, generator=g, dtype=DT) + 0.5, "c_norm.bias": r(H)})  # fmt: skip
    else:
        sd["x2g.bias"] = r(4 * H)
    return sd


def _torchaudio_reference(sd, x, h, c, eps):
    ln = "g_norm.weight" in sd
    outs = []
    for t in range(x.shape[0]):
        gates = x[t] @ sd["x2g.weight"].t() + h @ sd["p2g.weight"].t()
        if ln:
            gates = _ln(gates, sd["g_norm.weight"], sd["g_norm.bias"], eps)
        else:
            gates = gates + sd["x2g.bias"]
        i, f, g, o = gates.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if ln:
            c = _ln(c, sd["c_norm.weight"], sd["c_norm.bias"], eps)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


@pytest.mark.parametrize("layer_norm", [False, True])
def test_from_torchaudio_computes_custom_lstms_function(layer_norm):
    g = torch.Generator().manual_seed(2)
    sd = _torchaudio_state_dict(layer_norm, g)
    eps = 1e-3
    layer = convert.from_torchaudio({"predictor.lstm_layers.0." + k: v for k, v in sd.items()}, layer_norm_epsilon=eps,
                                    prefix="predictor.lstm_layers.0.")  # fmt: skip
    x = torch.randn(T, B, I, generator=g, dtype=DT)
    h0, c0 = torch.randn(B, H, generator=g, dtype=DT), torch.randn(B, H, generator=g, dtype=DT)
    ref_out, ref_h, ref_c = _torchaudio_reference(sd, x, h0, c0, eps)
    for kernel in ["reference", "fused", "scan"]:
        layer.kernel = kernel
        out, (h, c) = layer.eval()(x, (h0[None], c0[None]))
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h[0], ref_h, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(c[0], ref_c, rtol=1e-10, atol=1e-10)
    back = convert.to_torchaudio(layer)
    _assert_same_state_dict(back, sd)


def test_torchaudio_refusals():
    with pytest.raises(ValueError, match="keys"):
        convert.from_torchaudio({"x2g.weight": torch.zeros(4 * H, I), "p2g.weight": torch.zeros(4 * H, H)})
    with pytest.raises(ValueError, match="one layer norm"):
        convert.to_torchaudio(recnorm.LSTM(I, H, norm="layer"))
    with pytest.raises(ValueError, match="GRU|gru"):
        convert.to_torchaudio(recnorm.GRU(I, H))
    with pytest.raises(ValueError, match="zoneout"):
        convert.to_torchaudio(recnorm.LSTM(I, H, zoneout=0.1))

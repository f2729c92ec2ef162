"""A peephole LSTM (Gers & Schmidhuber, 2000): the input and forget gates also see the previous cell
state, the output gate the new one, each through a per-unit weight.

    i = sigmoid(W_i x + R_i h + p_i * c)        f = sigmoid(W_f x + R_f h + p_f * c)
    g = tanh(W_g x + R_g h)                     c' = f * c + i * g
    o = sigmoid(W_o x + R_o h + p_o * c')       h' = o * tanh(c')

Torch has no such cell, so the steps are written out here; ONNX's `LSTM` operator has peepholes (its
input P), so the export emits that one node rather than an unrolled loop. The parameters keep torch's
nn.LSTM names and gate order (i, f, g, o), so the forget-gate bias initialisation applies unchanged; the
export reorders them to ONNX's (i, o, f, c; P in i, o, f).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


def peephole_lstm(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor, p: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The forward pass: x [B, T, in], h and c [B, H], weights in torch's layout, b = b_ih + b_hh [4H], p [3H] (i, f, o)
    -> out [B, T, H], h [B, H], c [B, H]."""
    p_i, p_f, p_o = p.chunk(3)
    pre_x = x @ w_ih.T + b  # [B, T, 4H]: the input's share of every step at once
    outs = []
    for t in range(x.shape[1]):
        pre_i, pre_f, pre_g, pre_o = (pre_x[:, t] + h @ w_hh.T).chunk(4, dim=1)
        i = torch.sigmoid(pre_i + p_i * c)
        f = torch.sigmoid(pre_f + p_f * c)
        c = f * c + i * torch.tanh(pre_g)
        h = torch.sigmoid(pre_o + p_o * c) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, dim=1), h, c


class _OnnxLSTM(torch.autograd.Function):
    """One ONNX `LSTM` node with peepholes, used only while exporting. Takes the weights in ONNX's layout:
    w [1, 4H, in], r [1, 4H, H], b [1, 8H] in gate order i, o, f, c, p [1, 3H] in i, o, f; h and c [1, B, H]."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, h: Tensor, c: Tensor, w: Tensor, r: Tensor, b: Tensor, p: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        p_i, p_o, p_f = p[0].chunk(3)
        b_w, b_r = b[0].chunk(2)
        w_ih, w_hh, b_sum = (_ifgo(t) for t in (w[0], r[0], b_w + b_r))
        out, h_n, c_n = peephole_lstm(x, h[0], c[0], w_ih, w_hh, b_sum, torch.cat([p_i, p_f, p_o]))
        return out, h_n[None], c_n[None]

    @staticmethod
    def symbolic(g: Any, x: Any, h: Any, c: Any, w: Any, r: Any, b: Any, p: Any) -> Any:
        no_lengths = g.op("prim::Constant")  # an absent optional input: every sequence is full length
        no_lengths.setType(torch._C.OptionalType.ofTensor())
        seq = g.op("Transpose", x, perm_i=[1, 0, 2])  # ONNX's default layout is [T, B, in]
        hidden = int(r.type().sizes()[2])
        y, y_h, y_c = g.op("LSTM", seq, w, r, b, no_lengths, h, c, p, hidden_size_i=hidden, outputs=3)
        out = g.op("Transpose", g.op("Squeeze", y, g.op("Constant", value_t=torch.tensor([1]))), perm_i=[1, 0, 2])
        return out, y_h, y_c


def _iofc(w: Tensor) -> Tensor:
    """Torch's gate blocks (i, f, g, o) in ONNX's order (i, o, f, c)."""
    i, f, g, o = w.chunk(4)
    return torch.cat([i, o, f, g])


def _ifgo(w: Tensor) -> Tensor:
    """ONNX's gate blocks (i, o, f, c) in torch's order (i, f, g, o)."""
    i, o, f, c = w.chunk(4)
    return torch.cat([i, f, c, o])


class PeepholeLSTM(nn.Module):
    """One layer, batch first, called like nn.LSTM: (x [B, T, in], (h [1, B, H], c [1, B, H])) -> (out, (h, c))."""

    def __init__(self, input_size: int, hidden_size: int, batch_first: bool = True) -> None:
        super().__init__()
        if not batch_first:
            raise ValueError("PeepholeLSTM is batch first only")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih_l0 = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh_l0 = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih_l0 = nn.Parameter(torch.empty(4 * hidden_size))
        self.bias_hh_l0 = nn.Parameter(torch.empty(4 * hidden_size))
        self.weight_peep_l0 = nn.Parameter(torch.empty(3 * hidden_size))  # p_i, p_f, p_o
        bound = 1.0 / math.sqrt(hidden_size)  # nn.LSTM's initialisation, the peepholes included
        for w in self.parameters():
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, c = state
        w_ih, w_hh, b_ih, b_hh, p = (
            self.weight_ih_l0,
            self.weight_hh_l0,
            self.bias_ih_l0,
            self.bias_hh_l0,
            self.weight_peep_l0,
        )
        if torch.onnx.is_in_onnx_export():
            # reordered here, on the weights alone, so the exporter folds them into initializers
            p_i, p_f, p_o = p.chunk(3)
            onnx_weights = (_iofc(w_ih), _iofc(w_hh), torch.cat([_iofc(b_ih), _iofc(b_hh)]), torch.cat([p_i, p_o, p_f]))
            out, h_n, c_n = _OnnxLSTM.apply(x, h, c, *(t[None] for t in onnx_weights))
            return out, (h_n, c_n)
        out, h_n, c_n = peephole_lstm(x, h[0], c[0], w_ih, w_hh, b_ih + b_hh, p)
        return out, (h_n[None], c_n[None])

"""Gradient flow through time in nn.RNN / nn.LSTM / nn.GRU, and the findings it supports.

:func:`through_time` runs one forward and backward in which every recurrent module is
unrolled step by step with its own parameters, so the gradient reaching each hidden state
``h_t`` of the top layer can be read: ``||dL/dh_t||`` for ``t = 0..T``, the total derivative
through all later steps. Its ratio first/last says how much of the gradient at the last step
survives the trip back to the initial state. :func:`through_time_findings` turns that into
``vanishing_through_time`` / ``exploding_through_time`` findings.

Not measured (the module runs its own forward, and its profile has empty ``norms``, a NaN
``ratio`` and the reason in ``skipped``): bidirectional modules, LSTMs with ``proj_size > 0``,
PackedSequence inputs, empty sequences, subclasses that override ``forward``, and modules the
forward never called. A loss that does not depend on the last state also gives a NaN ratio
(with its norms, and the reason in ``skipped``). In training mode, dropout between layers is
applied as the module does, with masks of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..detect.finding import Finding
from ..detect.fixes import CLIP, GATED_RNN, ORTHOGONAL_RECURRENT
from ..detect.thresholds import Thresholds

# nn.RNNBase.mode -> the kind reported; the class whose own forward the unroll stands in for.
_KINDS = {"RNN_TANH": "RNN", "RNN_RELU": "RNN", "LSTM": "LSTM", "GRU": "GRU"}
_CLASSES: dict[str, type[nn.Module]] = {"RNN": nn.RNN, "LSTM": nn.LSTM, "GRU": nn.GRU}
_NORMS_SAMPLED = 11


@dataclass(frozen=True, eq=False)  # eq=False: an ndarray field has no truth value to compare by
class TimeProfile:
    """How the gradient of the loss w.r.t. the top layer's hidden state changes over time.

    ``layer`` is the qualified module name ("(root)" for the model itself); ``kind`` is
    "RNN", "LSTM" or "GRU"; ``norms[t]`` is ``||dL/dh_t||`` (float64, ``t = 0..T``, ``h_0`` the
    initial state; for an LSTM ``h``, not the cell state ``c``; the norm over the whole batch
    of states); ``ratio`` is
    ``norms[0] / norms[-1]``, NaN when not measurable. ``nonlinearity`` is "tanh"/"relu" for
    nn.RNN and "" for gated modules. ``spectral_radius`` and ``max_singular_value`` are those
    of the top layer's recurrent matrix: ``weight_hh`` for nn.RNN, its candidate block (rows
    ``2H:3H``, the ``g`` gate of an LSTM, the ``n`` gate of a GRU) for gated modules, the
    square matrix through which the previous state feeds the new content. ``skipped`` says
    why a module was not measured, or why its ratio is NaN ("" when it was measured).
    """

    layer: str
    kind: str
    norms: np.ndarray
    ratio: float
    nonlinearity: str = ""
    spectral_radius: float = math.nan
    max_singular_value: float = math.nan
    skipped: str = ""

    @property
    def steps(self) -> int:
        """T, the sequence length (0 when not measured)."""
        return max(len(self.norms) - 1, 0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (norms as a list of floats)."""
        return {
            "layer": self.layer,
            "kind": self.kind,
            "norms": [float(v) for v in self.norms],
            "ratio": float(self.ratio),
            "nonlinearity": self.nonlinearity,
            "spectral_radius": float(self.spectral_radius),
            "max_singular_value": float(self.max_singular_value),
            "skipped": self.skipped,
        }


def _kind(module: nn.Module) -> str | None:
    """"RNN", "LSTM" or "GRU" for the recurrent modules this measures, else None."""
    if isinstance(module, (nn.RNN, nn.LSTM, nn.GRU)):
        return _KINDS.get(module.mode)
    return None


def _unsupported(module: nn.RNNBase) -> str:
    """Why the module's configuration cannot be unrolled here ("" if it can)."""
    kind = _KINDS[module.mode]
    if type(module).forward is not _CLASSES[kind].forward:
        return f"{type(module).__name__} overrides forward"
    if module.bidirectional:
        return "bidirectional"
    if getattr(module, "proj_size", 0) > 0:
        return "proj_size > 0"
    return ""


def _recurrent_matrix(module: nn.RNNBase) -> torch.Tensor:
    """The top layer's square recurrent matrix: weight_hh, or its candidate block for LSTM/GRU."""
    w = getattr(module, f"weight_hh_l{module.num_layers - 1}").detach()
    if module.mode in ("LSTM", "GRU"):
        h = module.hidden_size
        w = w[2 * h : 3 * h]  # rows [i|f|g|o] for LSTM and [r|z|n] for GRU: g and n are the candidates
    return w


def _spectrum(module: nn.RNNBase) -> tuple[float, float]:
    """Spectral radius (largest |eigenvalue|) and largest singular value of the recurrent matrix."""
    w = _recurrent_matrix(module).double().cpu().numpy()
    if not np.all(np.isfinite(w)):
        return math.nan, math.nan
    smax = float(np.linalg.norm(w, 2))
    if w.shape[0] != w.shape[1]:  # proj_size > 0: the state is projected, no eigenvalues to speak of
        return math.nan, smax
    return float(np.max(np.abs(np.linalg.eigvals(w)))), smax


def _unroll(module: nn.RNNBase, input: torch.Tensor, hx: Any, record: list[torch.Tensor]) -> Any:
    """What ``module(input, hx)`` returns, computed one step at a time with the module's own parameters.

    Appends the top layer's hidden states ``h_0..h_T`` to ``record``; ``h_0`` is made to
    require grad (a clone of the given state when that already does, so gradients still
    reach whoever produced it) so that the gradient w.r.t. every ``h_t`` can be asked for.
    """
    mode = module.mode
    lstm = mode == "LSTM"
    batched = input.dim() == 3
    x = input if batched else input.unsqueeze(1)  # time-major from here on: (T, B, F)
    if batched and module.batch_first:
        x = x.transpose(0, 1)
    steps, batch = x.shape[0], x.shape[1]
    layers, hidden = module.num_layers, module.hidden_size

    if hx is None:
        zeros = torch.zeros(layers, batch, hidden, dtype=x.dtype, device=x.device)
        h0, c0 = zeros, (zeros if lstm else None)
    elif lstm:
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    if not batched and hx is not None:
        h0 = h0.unsqueeze(1)
        c0 = c0.unsqueeze(1) if c0 is not None else None

    h_last: list[torch.Tensor] = []
    c_last: list[torch.Tensor] = []
    for k in range(layers):
        w_ih, w_hh = getattr(module, f"weight_ih_l{k}"), getattr(module, f"weight_hh_l{k}")
        b_ih = getattr(module, f"bias_ih_l{k}") if module.bias else None
        b_hh = getattr(module, f"bias_hh_l{k}") if module.bias else None
        top = k == layers - 1
        h = h0[k]
        if top:
            h = h.clone() if h.requires_grad else h.detach().clone().requires_grad_(True)
            record.append(h)
        c = c0[k] if c0 is not None else None
        outs: list[torch.Tensor] = []
        for t in range(steps):
            if lstm:
                assert c is not None
                h, c = torch.lstm_cell(x[t], (h, c), w_ih, w_hh, b_ih, b_hh)
            elif mode == "GRU":
                h = torch.gru_cell(x[t], h, w_ih, w_hh, b_ih, b_hh)
            elif mode == "RNN_TANH":
                h = torch.rnn_tanh_cell(x[t], h, w_ih, w_hh, b_ih, b_hh)
            else:
                h = torch.rnn_relu_cell(x[t], h, w_ih, w_hh, b_ih, b_hh)
            outs.append(h)
            if top:
                record.append(h)
        h_last.append(h)
        if c is not None:
            c_last.append(c)
        x = torch.stack(outs)
        if not top and module.dropout > 0 and module.training:
            x = F.dropout(x, module.dropout, training=True)  # as nn.RNNBase: between layers, not after the last

    output = x
    h_n = torch.stack(h_last)
    c_n = torch.stack(c_last) if lstm else None
    if not batched:
        output, h_n = output.squeeze(1), h_n.squeeze(1)
        c_n = c_n.squeeze(1) if c_n is not None else None
    elif module.batch_first:
        output = output.transpose(0, 1)
    return (output, (h_n, c_n)) if lstm else (output, h_n)


def _patched_forward(
    module: nn.RNNBase, calls: list[list[torch.Tensor]], skipped: list[str]
) -> Callable[..., Any]:
    """A forward for the instance that unrolls supported inputs and records each call's states."""
    original = type(module).forward

    def forward(input: Any, hx: Any = None) -> Any:
        if isinstance(input, PackedSequence):
            skipped.append("PackedSequence input")
            return original(module, input, hx)
        time_dim = 1 if input.dim() == 3 and module.batch_first else 0
        if input.dim() not in (2, 3) or input.shape[time_dim] == 0:
            skipped.append("empty sequence or unexpected input shape")
            return original(module, input, hx)
        record: list[torch.Tensor] = []
        out = _unroll(module, input, hx, record)
        calls.append(record)
        return out

    return forward


def through_time(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    loss_fn: Callable[..., torch.Tensor],
) -> list[TimeProfile]:
    """``||dL/dh_t||`` over time for every nn.RNN / nn.LSTM / nn.GRU in the model, from one forward and backward.

    The loss is ``loss_fn(model(inputs), targets)`` (``loss_fn(model(inputs))`` when
    ``targets`` is None; summed if not a scalar). During that one forward each recurrent
    module's ``forward`` is replaced on the instance by an explicit unroll with its own
    parameters that returns exactly what the module returns, so the rest of the model is
    unaffected; it is restored afterwards. The gradients are taken with
    ``torch.autograd.grad`` w.r.t. the hidden states only, so parameters and their
    ``.grad`` are left as they were. A module called several times is profiled on its
    longest call. One profile per recurrent module, in ``named_modules`` order; models
    without one give ``[]``.
    """
    found = [(name or "(root)", m) for name, m in model.named_modules() if _kind(m) is not None]
    if not found:
        return []
    calls: dict[int, list[list[torch.Tensor]]] = {id(m): [] for _, m in found}
    skipped: dict[int, list[str]] = {id(m): [] for _, m in found}
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for _, m in found:
            assert isinstance(m, nn.RNNBase)
            reason = _unsupported(m)
            if reason:
                skipped[id(m)].append(reason)
                continue
            patched.append((m, m.__dict__.get("forward")))
            m.forward = _patched_forward(m, calls[id(m)], skipped[id(m)])  # type: ignore[method-assign]
        with torch.enable_grad():
            out = model(inputs)
            loss = loss_fn(out) if targets is None else loss_fn(out, targets)
    finally:
        for m, saved in patched:
            if saved is None:
                del m.forward
            else:
                m.forward = saved  # type: ignore[method-assign]

    chosen = {key: max(records, key=len) for key, records in calls.items() if records}
    states = [h for records in chosen.values() for h in records]
    grads: list[torch.Tensor | None] = [None] * len(states)
    # A state computed under no_grad (inside the model's own code) is outside the graph: no gradient.
    in_graph = [i for i, h in enumerate(states) if h.requires_grad]
    if in_graph and loss.requires_grad:
        found_grads = torch.autograd.grad(loss.sum(), [states[i] for i in in_graph], allow_unused=True)
        for i, g in zip(in_graph, found_grads):
            grads[i] = g
    # One float64 vector of norms for all states, read back once; an unused state got no gradient (0).
    norms_all = np.zeros(0)
    if states:
        zero = states[0].new_zeros((), dtype=torch.float64)
        norms_all = torch.stack([g.detach().double().norm() if g is not None else zero for g in grads]).cpu().numpy()

    profiles: list[TimeProfile] = []
    at = 0
    for name, m in found:
        assert isinstance(m, nn.RNNBase)
        kind = _KINDS[m.mode]
        nonlinearity = m.nonlinearity if isinstance(m, nn.RNN) else ""
        rho, smax = _spectrum(m)
        records = chosen.get(id(m))
        if records is None:
            reason = "; ".join(dict.fromkeys(skipped[id(m)])) or "not called in the forward"
            profiles.append(TimeProfile(name, kind, np.zeros(0), math.nan, nonlinearity, rho, smax, reason))
            continue
        norms = np.asarray(norms_all[at : at + len(records)], dtype=np.float64)
        at += len(records)
        measurable = bool(norms[-1] > 0 and np.isfinite(norms[-1]))
        ratio = float(norms[0] / norms[-1]) if measurable else math.nan
        reason = "" if measurable else "no finite, non-zero gradient reached the last state"
        profiles.append(TimeProfile(name, kind, norms, ratio, nonlinearity, rho, smax, reason))
    return profiles


def _sampled(norms: np.ndarray) -> tuple[list[int], list[float]]:
    """Up to 11 evenly spaced steps and their norms, for the evidence."""
    idx = sorted({int(round(i)) for i in np.linspace(0, len(norms) - 1, _NORMS_SAMPLED)})
    return idx, [float(norms[i]) for i in idx]


def _jacobian_words(p: TimeProfile) -> str:
    """The factors of one step's recurrent Jacobian, in words."""
    rho = f"spectral radius {p.spectral_radius:.2f}"
    if p.kind == "RNN":
        bound = "tanh' <= 1" if p.nonlinearity == "tanh" else "relu' in {0, 1}"
        return f"{bound} times W_hh, {rho}"
    if p.kind == "LSTM":
        return f"the forget gate on the cell path; on the hidden path gates times the candidate block of W_hh, {rho}"
    return f"the update gate on the direct path; on the other the gates times the candidate block of W_hh, {rho}"


def through_time_findings(profiles: list[TimeProfile], th: Thresholds) -> list[Finding]:
    """vanishing_through_time / exploding_through_time findings from the profiles of :func:`through_time`."""
    findings: list[Finding] = []
    for p in profiles:
        if math.isnan(p.ratio):
            continue  # not measured
        steps_idx, sampled = _sampled(p.norms)
        # The geometric mean of the per-step change: what one step does to the gradient on average.
        per_step = float(p.ratio ** (1.0 / p.steps)) if p.steps > 0 else 1.0
        evidence: dict[str, Any] = {
            "ratio": float(p.ratio),
            "steps": int(p.steps),
            "per_step_factor": per_step,
            "norms_sampled": sampled,
            "steps_sampled": steps_idx,
            "norm_last": float(p.norms[-1]),
            "norm_initial": float(p.norms[0]),
            "module_kind": p.kind,
            "spectral_radius": float(p.spectral_radius),
            "max_singular_value": float(p.max_singular_value),
            "recurrent_matrix": "weight_hh" if p.kind == "RNN" else "weight_hh candidate block (rows 2H:3H)",
        }
        if p.nonlinearity:
            evidence["nonlinearity"] = p.nonlinearity
        if p.ratio < th.vanishing_warning:
            severity = "error" if p.ratio < th.vanishing_error else "warning"
            message = (
                f"the gradient reaching the initial state of {p.layer} is {p.ratio:.1e} of the one at the last step, "
                f"over {p.steps} steps ({per_step:.2f} per step): each step multiplies it by the recurrent Jacobian "
                f"({_jacobian_words(p)}), so early inputs cannot be learned"
            )
            findings.append(
                Finding(
                    kind="vanishing_through_time", severity=severity, message=message, layer=p.layer,
                    evidence=evidence, fixes=(GATED_RNN, ORTHOGONAL_RECURRENT),
                )
            )
        elif p.ratio > th.exploding_warning:
            severity = "error" if p.ratio > th.exploding_error else "warning"
            message = (
                f"the gradient reaching the initial state of {p.layer} is {p.ratio:.1e} times the one at the last "
                f"step, over {p.steps} steps ({per_step:.2f} per step): each step multiplies it by the recurrent "
                f"Jacobian ({_jacobian_words(p)}; largest singular value {p.max_singular_value:.2f}), which grows it "
                f"geometrically, so the earliest steps dominate the update and training is unstable"
            )
            findings.append(
                Finding(
                    kind="exploding_through_time", severity=severity, message=message, layer=p.layer,
                    evidence=evidence, fixes=(CLIP, ORTHOGONAL_RECURRENT, GATED_RNN),
                )
            )
    return findings

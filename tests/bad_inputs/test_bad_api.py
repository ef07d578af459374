"""Bad input at the API boundary: every public function gets the right result or ONE clear, typed error.

Each table row is (what is passed, the call, the exception type, a fragment of its message).
"""

from __future__ import annotations

import io
import json
import math
import os
import sqlite3
import zipfile

import numpy as np
import pytest
import torch
from ranks import spawn
from torch import nn

import gradguard as gg
from gradguard import StoreError


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(16, 4), torch.randn(16, 2)


MSE = nn.MSELoss()
TENSOR = torch.randn(3, 4)

# -- wrong types: a tensor where a module goes, a string, None, a list of modules ----------------------------
WRONG_MODELS = {"tensor": TENSOR, "string": "model", "None": None, "list of modules": [nn.Linear(2, 2)]}
MODEL_FUNCTIONS = {
    "watch": (lambda m: gg.watch(m), TypeError, "expects a torch.nn.Module"),
    "Watch": (lambda m: gg.Watch(m), TypeError, "expects a torch.nn.Module"),
    "diagnose": (lambda m: gg.diagnose(m, _batch(), MSE, steps=1, hessian=False), TypeError, "nn.Module"),
    "init_": (lambda m: gg.init_(m, "kaiming"), TypeError, "Pass the model itself"),
    "lsuv": (lambda m: gg.lsuv(m, TENSOR), TypeError, "Pass the model itself"),
    "zero_init_residual_": (lambda m: gg.zero_init_residual_(m), TypeError, "Pass the model itself"),
    "insert_normalization": (lambda m: gg.insert_normalization(m), TypeError, "model must be an nn.Module"),
    "residualize": (lambda m: gg.residualize(m), TypeError, "model must be an nn.Module"),
    "swap_activation": (lambda m: gg.swap_activation(m, nn.ReLU, nn.Tanh), TypeError, "model must be an nn.Module"),
    "prepend_standardizer": (lambda m: gg.prepend_standardizer(m, TENSOR), TypeError, "model must be an nn.Module"),
    "localize": (lambda m: gg.localize(m, _batch(), MSE), TypeError, "localize expects an nn.Module"),
    "NonFiniteGuard": (lambda m: gg.NonFiniteGuard(m), TypeError, "optimizer must be a torch.optim.Optimizer"),
    "detect": (lambda m: gg.detect(m), TypeError, "expects a gradguard Trace"),
}


@pytest.mark.parametrize("given", sorted(WRONG_MODELS))
@pytest.mark.parametrize("function", sorted(MODEL_FUNCTIONS))
def test_wrong_model_type(function, given):
    call, exc, match = MODEL_FUNCTIONS[function]
    with pytest.raises(exc, match=match):
        call(WRONG_MODELS[given])


# Parameter-taking functions (clippers, penalties): a tensor is a valid parameter; the rest are not.
WRONG_PARAMS = {
    "string": ("model", "got str"),
    "None": (None, "NoneType"),
    "list of modules": ([nn.Linear(2, 2)], "got (a )?Linear"),
    "a module": (nn.Linear(2, 2), "pass model.parameters()"),
}
PARAM_FUNCTIONS = {
    "clip_grad_norm_": lambda p: gg.clip_grad_norm_(p, 1.0),
    "clip_grad_value_": lambda p: gg.clip_grad_value_(p, 1.0),
    "adaptive_clip_grad_": lambda p: gg.adaptive_clip_grad_(p),
    "AutoClip": lambda p: gg.AutoClip()(p),
    "ZScoreClip": lambda p: gg.ZScoreClip()(p),
}


@pytest.mark.parametrize("given", sorted(WRONG_PARAMS))
@pytest.mark.parametrize("function", sorted(PARAM_FUNCTIONS))
def test_wrong_parameters_type(function, given):
    value, match = WRONG_PARAMS[given]
    with pytest.raises(TypeError, match=match):
        PARAM_FUNCTIONS[function](value)


@pytest.mark.parametrize("penalty", [gg.l1_penalty, gg.l2_penalty])
@pytest.mark.parametrize(
    "given, match", [("model", "got a str"), (None, "got NoneType"), ([nn.Linear(2, 2)], "Linear")]
)
def test_penalty_wrong_type(penalty, given, match):
    with pytest.raises(TypeError, match=match):
        penalty(given, 0.1)


def test_a_tensor_is_a_parameter_for_clippers_and_penalties():
    p = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    p.grad = torch.tensor([[3.0, 4.0]])
    assert float(gg.clip_grad_norm_(p, 1.0)) == pytest.approx(5.0)
    assert float(torch.linalg.vector_norm(p.grad)) == pytest.approx(1.0, rel=1e-5)
    assert float(gg.l2_penalty(p, 0.5).detach()) == pytest.approx(12.5)  # weight * sum(w ** 2)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: gg.Trace("fc"), TypeError, "list of layer names"),
        (lambda: gg.Trace(None), TypeError, "list of layer names"),
        (lambda: gg.Trace([1, 2]), TypeError, "list of layer names"),
        (lambda: gg.Trace(["a"], meta=[1]), TypeError, "meta must be a dict"),
        (lambda: gg.load(None), TypeError, "path of a .db store"),
        (lambda: gg.load(TENSOR), TypeError, "path of a .db store"),
        (lambda: gg.load_findings(None), TypeError, "path of a .db store"),
        (lambda: gg.Thresholds(window=0), ValueError, "window"),
    ],
)
def test_wrong_types_elsewhere(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# -- empty models and models with only buffers ---------------------------------------------------------------
PARAMLESS = {"empty Sequential": nn.Sequential, "only buffers": lambda: nn.BatchNorm1d(4, affine=False)}
PARAMLESS_CALLS = {
    "watch": (lambda m: gg.watch(m), ValueError, "has no parameters"),
    "diagnose": (lambda m: gg.diagnose(m, _batch(), MSE, steps=1, hessian=False), ValueError, "has no parameters"),
    "init_": (lambda m: gg.init_(m, "kaiming"), ValueError, "no weight to initialise"),
    "lsuv": (lambda m: gg.lsuv(m, TENSOR), ValueError, "no weight to initialise"),
    "insert_normalization": (lambda m: gg.insert_normalization(m), ValueError, "nothing to normalise"),
    "residualize": (lambda m: gg.residualize(m), ValueError, "has none"),
    "swap_activation": (lambda m: gg.swap_activation(m, nn.ReLU, nn.Tanh), ValueError, "nothing to swap"),
    "zero_init_residual_": (lambda m: gg.zero_init_residual_(m), ValueError, "pass names="),
    "l2_penalty": (lambda m: gg.l2_penalty(m, 0.1), ValueError, "no parameters to penalise"),
    "clip_grad_norm_": (lambda m: gg.clip_grad_norm_(m, 1.0), TypeError, "pass model.parameters()"),
}


@pytest.mark.parametrize("model", sorted(PARAMLESS))
@pytest.mark.parametrize("function", sorted(PARAMLESS_CALLS))
def test_model_without_parameters(function, model):
    call, exc, match = PARAMLESS_CALLS[function]
    with pytest.raises(exc, match=match):
        call(PARAMLESS[model]())


@pytest.mark.parametrize("model", sorted(PARAMLESS))
def test_model_without_parameters_has_nothing_to_clip(model):
    params = list(PARAMLESS[model]().parameters())
    assert float(gg.clip_grad_norm_(params, 1.0)) == 0.0
    assert float(gg.AutoClip()(params).clip_coef) == 1.0


def test_standardizer_of_an_empty_model_is_the_standardizer():
    x = torch.randn(32, 3) * 5 + 2
    out = gg.prepend_standardizer(nn.Sequential(), x)(x)
    torch.testing.assert_close(out.mean(0), torch.zeros(3), atol=1e-5, rtol=0)


# -- wrong shapes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: gg.diagnose(_mlp(), (torch.randn(8, 5), torch.randn(8, 2)), MSE, steps=1, hessian=False),
         ValueError, r"could not run on the batch.*8x5 and 4x8"),
        (lambda: gg.diagnose(_mlp(), (torch.randn(8, 4), torch.randn(8, 3)), MSE, steps=1, hessian=False),
         ValueError, r"loss_fn failed on the model's output \(8, 2\)"),
        (lambda: gg.diagnose(_mlp(), torch.randn(8, 4), MSE, steps=1), TypeError, "batch must be a pair"),
        (lambda: gg.diagnose(_mlp(), (torch.randn(8, 4),), MSE, steps=1), TypeError, "of length 1"),
        (lambda: gg.diagnose(_mlp(), _batch(), lambda o, t: (o - t) ** 2, steps=1, hessian=False),
         ValueError, "must return a scalar"),
        (lambda: gg.InputStandardizer(torch.zeros(3), torch.ones(4)), ValueError, "same shape"),
        (lambda: gg.InputStandardizer.fit(torch.randn(10, 3))(torch.randn(5, 4)), ValueError,
         r"fitted on features of shape \(3,\).*\(5, 4\)"),
        (lambda: gg.InputStandardizer.fit(torch.randn(10, 3))(torch.randn(5, 1)), ValueError, "fitted on features"),
        (lambda: gg.InputStandardizer.fit(torch.randn(10, 3, 2))(torch.randn(5, 3)), ValueError, "fitted on"),
        (lambda: gg.prepend_standardizer(_mlp(), torch.randn(10, 5)), ValueError, "data has 5 features.*takes 4"),
        (lambda: gg.prepend_standardizer(_mlp(), torch.randn(10, 4))(torch.randn(3, 5)), ValueError, "fitted on"),
        (lambda: gg.prepend_standardizer(_mlp(), torch.randn(10, 4), dim=3), ValueError, "out of range"),
        (lambda: gg.prepend_standardizer(_mlp(), torch.randn(0, 4)), ValueError, "zero-size"),
        (lambda: gg.watch(_mlp()).step(loss=torch.ones(8, 2)), ValueError, r"loss must be a scalar.*\(8, 2\)"),
        (lambda: gg.watch(_mlp()).log_loss(torch.ones(3)), ValueError, r"loss must be a scalar.*\(3,\)"),
    ],
)
def test_wrong_shapes(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_standardizer_shapes_that_are_right():
    images = torch.randn(20, 3, 5, 5) * 4 + 1
    per_channel = gg.InputStandardizer.fit(images, dim=(0, 2, 3))
    out = per_channel(torch.randn(2, 3, 7, 7))  # another image size: the channel count is what matters
    assert out.shape == (2, 3, 7, 7)
    single = gg.InputStandardizer.fit(torch.randn(10, 4))(torch.randn(4))  # one unbatched sample
    assert single.shape == (4,)


# -- sparse gradients ----------------------------------------------------------------------------------------
def _sparse_model() -> nn.Sequential:
    return nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Linear(3, 1))


@pytest.mark.parametrize("optimizer", ["SGD", "SparseAdam"])
def test_watch_sparse_gradients_match_float64(optimizer):
    model = _sparse_model()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if optimizer == "SGD"
           else torch.optim.SparseAdam(list(model[0].parameters()), lr=0.1))
    idx = torch.tensor([1, 1, 4, 7])  # a repeated index: the sparse gradient has duplicates to coalesce
    expected = []
    with gg.watch(model, optimizer=opt, flush_every=2) as w:
        for _ in range(3):
            model(idx).sum().backward()
            expected.append(float(model[0].weight.grad.to_dense().double().norm()))
            opt.step()
            opt.zero_grad()
    np.testing.assert_allclose(w.trace.metric("grad_norm")[:, 0], expected, rtol=1e-6)


def test_guard_sees_a_nan_in_a_sparse_gradient():
    model = nn.Sequential(nn.Embedding(10, 3, sparse=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.NonFiniteGuard(opt, model=model)
    model(torch.tensor([1, 2])).sum().backward()
    guard.step()
    assert guard.skipped == 0
    before = model[0].weight.detach().clone()
    model[0].weight.grad = torch.sparse_coo_tensor([[1]], torch.tensor([[math.nan, 0.0, 0.0]]), (10, 3))
    guard.step()
    assert guard.skipped == 1 and torch.equal(model[0].weight.detach(), before)


@pytest.mark.parametrize("function", sorted(PARAM_FUNCTIONS))
def test_clippers_refuse_sparse_gradients(function):
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse_coo gradient.*sparse=False"):
        PARAM_FUNCTIONS[function](emb.parameters())


def test_diagnose_a_sparse_embedding_model():
    model = nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Flatten(), nn.Linear(6, 1))
    batch = (torch.randint(0, 10, (8, 2)), torch.randn(8, 1))
    result = gg.diagnose(model, batch, MSE, steps=2, hessian=False)
    assert np.isfinite(result.trace.metric("grad_norm")[0]).all()


# -- complex and meta-device parameters -----------------------------------------------------------------------
def _complex() -> nn.Linear:
    m = nn.Linear(2, 2).to(torch.complex64)
    m(torch.randn(4, 2, dtype=torch.complex64)).abs().sum().backward()
    return m


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: gg.watch(_complex()), TypeError, "is complex.*view_as_real"),
        (lambda: gg.diagnose(_complex(), (torch.randn(4, 2), torch.randn(4, 2)), MSE, steps=1), TypeError,
         "is complex"),
        (lambda: gg.clip_grad_value_(_complex().parameters(), 0.1), TypeError, "complex: use clip_grad_norm_"),
    ],
)
def test_complex_parameters(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_complex_norm_clip_is_pytorch():
    ours, theirs = _complex(), _complex()
    theirs.weight.grad, theirs.bias.grad = ours.weight.grad.clone(), ours.bias.grad.clone()
    total = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1)
    assert torch.equal(gg.clip_grad_norm_(ours.parameters(), 0.1), total)
    assert torch.equal(ours.weight.grad, theirs.weight.grad)


def _meta() -> nn.Sequential:
    with torch.device("meta"):
        return _mlp()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: gg.diagnose(_meta(), _batch(), MSE, steps=1), "meta device.*to_empty"),
        (lambda: gg.lsuv(_meta(), TENSOR), "meta device.*to_empty"),
        (lambda: gg.localize(_meta(), _batch(), MSE), "meta device.*to_empty"),
        (lambda: gg.watch(_meta(), store="unused.db"), "meta device"),
    ],
)
def test_meta_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_meta_model_can_be_initialised_and_watched_without_values():
    model = gg.init_(_meta(), "kaiming")  # the to_empty pattern: shapes now, values later
    assert model[0].weight.is_meta
    with gg.watch(model) as w:
        w.step()
    assert len(w.trace) == 1 and np.isnan(w.trace.metric("grad_norm")).all()  # nothing measured, not zeros


# -- wrapped models ------------------------------------------------------------------------------------------
def _run(model, wrapper=lambda m: m, steps=2):
    torch.manual_seed(3)
    wrapped = wrapper(model)
    x, y = _batch()
    with gg.watch(wrapped, flush_every=1, weights_every=1) as w:
        for _ in range(steps):
            MSE(wrapped(x), y).backward()
            w.step()
            model.zero_grad()
    return w


def test_data_parallel_is_the_model_itself():
    torch.manual_seed(0)
    plain, inner = _mlp(), _mlp()
    inner.load_state_dict(plain.state_dict())
    a, b = _run(plain), _run(inner, nn.DataParallel)
    assert b.layers == a.layers == ["0", "2"]  # no "module." prefix
    np.testing.assert_array_equal(b.trace.values(), a.trace.values())
    gg.init_(nn.DataParallel(_mlp()), "kaiming")
    gg.diagnose(nn.DataParallel(_mlp()), _batch(), MSE, steps=1, hessian=False)


def _ddp_one_rank(rank: int) -> None:
    torch.manual_seed(0)
    plain, inner = _mlp(), _mlp()
    inner.load_state_dict(plain.state_dict())
    a, b = _run(plain), _run(inner, nn.parallel.DistributedDataParallel)
    assert b.layers == a.layers
    np.testing.assert_allclose(b.trace.values(), a.trace.values(), rtol=1e-12, equal_nan=True)


def test_ddp_one_process_gloo():
    # A spawned rank, not this process: torch 2.13 can abort a DDP process at exit (see tests/ranks.py).
    spawn(_ddp_one_rank, world=1)


# -- one model, two watches; lifecycle -------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["fused", "hooks"])
def test_two_watches_on_one_model_both_record_what_one_would(strategy):
    """Two monitors at once (a user's and a library's) are independent: each sees what it would alone."""
    def train(n_watches):
        torch.manual_seed(0)
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ws = [gg.watch(model, optimizer=opt, flush_every=2, weights_every=1, activations_every=2, strategy=strategy)
              for _ in range(n_watches)]
        x, y = _batch()
        for _ in range(4):
            opt.zero_grad()
            loss = MSE(model(x), y)
            loss.backward()
            for w in ws:
                w.log_loss(loss)
            opt.step()
        for w in ws:
            w.close()
        return ws

    (alone,), pair = train(1), train(2)
    for w in pair:
        assert len(w.trace) == 4
        np.testing.assert_array_equal(w.trace.values(), alone.trace.values())
        np.testing.assert_array_equal(w.trace.loss, alone.trace.loss)


def test_close_twice_and_use_after_close(tmp_path):
    model = _mlp()
    w = gg.watch(model, store=tmp_path / "run.db")
    model(TENSOR).sum().backward()
    w.step()
    w.close()
    w.close()  # a no-op
    assert w.closed and len(gg.load(tmp_path / "run.db")) == 1
    with pytest.raises(RuntimeError, match="this Watch is closed; create a new one"):
        w.step()
    with pytest.raises(RuntimeError, match="closed"):
        w.log_loss(1.0)


# -- stores that are not stores ------------------------------------------------------------------------------
def _good_store(path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 1))
    with gg.watch(model, store=path, flush_every=2) as w:
        for _ in range(5):
            model(torch.randn(3, 4)).sum().backward()
            w.step(loss=1.0)
    return w


def _set_meta(path, key, value):
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))
    db.close()


STORES = {
    # name: (make(path), exception, message fragment)
    "newer schema": (lambda p: _set_meta(p, "schema_version", "99"), StoreError, "newer gradguard.*upgrade"),
    "schema not a number": (lambda p: _set_meta(p, "schema_version", '"x"'), StoreError, "damaged.*schema_version"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 3]), StoreError, "not a readable"),
    "header only": (lambda p: p.write_bytes(p.read_bytes()[:50]), StoreError, "not a readable"),
    "random bytes": (lambda p: p.write_bytes(os.urandom(4096)), StoreError, "not an SQLite file"),
    "empty file": (lambda p: p.write_bytes(b""), StoreError, "not an SQLite file"),
    "a directory": (lambda p: (p.unlink(), p.mkdir()), StoreError, "not a file"),
    "another SQLite file": (lambda p: (p.unlink(), sqlite3.connect(p).execute("CREATE TABLE t (x)")), StoreError,
                            "no such table: meta"),
}


@pytest.mark.parametrize("reader", ["load", "load_findings"])
@pytest.mark.parametrize("case", sorted(STORES))
def test_bad_store(tmp_path, case, reader):
    path = tmp_path / "run.db"
    _good_store(path)
    for suffix in ("-wal", "-shm"):  # a closed store has none; make sure the damage is the whole story
        assert not os.path.exists(f"{path}{suffix}")
    make, exc, match = STORES[case]
    make(path)
    with pytest.raises(exc, match=match):
        getattr(gg, reader)(path)


@pytest.mark.parametrize("reader", ["load", "load_findings"])
def test_missing_store(tmp_path, reader):
    with pytest.raises((FileNotFoundError, StoreError), match="no such file|does not exist"):
        getattr(gg, reader)(tmp_path / "nope.db")


def test_store_in_a_missing_folder_or_on_a_non_store(tmp_path):
    with pytest.raises(StoreError, match="does not exist; create it first"):
        gg.watch(_mlp(), store=tmp_path / "no" / "run.db")
    notes = tmp_path / "notes.db"
    notes.write_text("mine")
    with pytest.raises(StoreError, match="not a gradguard store"):
        gg.watch(_mlp(), store=notes, overwrite=True)
    assert notes.read_text() == "mine"


# -- malformed .npz traces -----------------------------------------------------------------------------------
def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _zip_of(name, text) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(name, text)
    return buf.getvalue()


def _good_arrays(tmp_path) -> dict[str, np.ndarray]:
    t = gg.Trace(["a", "b"])
    t.append(np.arange(5), np.ones((5, len(gg.METRICS), 2)), np.zeros(5))
    with np.load(t.save(tmp_path / "good.npz")) as z:
        return {k: z[k] for k in z.files}


def _with(arrays, **changes):
    return _npz(**{**arrays, **changes})


NPZ = {
    "random bytes": lambda a: os.urandom(1000),
    "zip, not npz": lambda a: _zip_of("hello.txt", "hi"),
    "wrong arrays": lambda a: _npz(x=np.zeros(3)),
    "values of the wrong rank": lambda a: _with(a, values=np.zeros((2, 3))),
    "values for other layers": lambda a: _with(a, values=np.zeros((5, len(gg.METRICS), 7))),
    "steps of the wrong length": lambda a: _with(a, steps=np.arange(4)),
    "newer version": lambda a: _with(a, header=np.array(json.dumps({"format": "gradguard.trace", "version": 99}))),
    "header not an object": lambda a: _with(a, header=np.array("[1, 2]")),
    "layers not a list": lambda a: _with(a, layers=np.array("5")),
    "meta not an object": lambda a: _with(a, meta=np.array("[1]")),
    "layers not JSON": lambda a: _with(a, layers=np.array("not json")),
    "pickled objects": lambda a: _with(a, values=np.array([object()], dtype=object)),
}


@pytest.mark.parametrize("case", sorted(NPZ))
def test_bad_npz(tmp_path, case):
    arrays = _good_arrays(tmp_path)
    path = tmp_path / "bad.npz"
    path.write_bytes(NPZ[case](arrays))
    with pytest.raises(ValueError, match="not a gradguard store|not a readable gradguard trace") as err:
        gg.load(path)
    if case == "newer version":
        assert "upgrade gradguard" in str(err.value)


def test_good_npz_loads(tmp_path):
    arrays = _good_arrays(tmp_path)
    path = tmp_path / "again.npz"
    path.write_bytes(_npz(**arrays))
    assert gg.load(path).layers == ["a", "b"] and len(gg.load(path)) == 5

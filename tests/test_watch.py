"""watch: every statistic against an independent float64 reference, and its lifecycle."""

from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import torch
from conftest import mlp, ref_layer_grad, ref_norm, rel
from torch import nn

import gradguard
from gradguard.probe.kernels import LARGE

STRATEGIES = ["auto", "fused", "hooks"]


def _train_step(model, opt, x, y, w):
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    w.step(loss=loss)
    return loss


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gradient_statistics_match_float64(strategy, dtype):
    # A wide first layer (> LARGE elements) takes the in-backward path under "auto".
    model = nn.Sequential(nn.Linear(256, 200), nn.ReLU(), nn.Linear(200, 64), nn.Tanh(), nn.Linear(64, 10)).to(dtype)
    assert model[0].weight.numel() >= LARGE
    x, y = torch.randn(32, 256, dtype=dtype), torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # Full steps (0, 2, 4) also measure the max-abs; ordinary ones (1, 3) read each gradient once.
    w = gradguard.watch(model, strategy=strategy, activations_every=0, flush_every=3, weights_every=2)
    refs = []
    for _ in range(5):
        _train_step(model, opt, x, y, w)
        refs.append([ref_layer_grad(model[i]) for i in (0, 2, 4)])
        opt.step()
    w.close()
    t = w.trace
    assert t.layers == ["0", "2", "4"] and list(t.steps) == [0, 1, 2, 3, 4]
    for s in range(5):
        for j in range(3):
            norm, amax, bad = refs[s][j]
            assert rel(t.metric("grad_norm")[s, j], norm) < 1e-5
            if s % 2 == 0:
                assert rel(t.metric("grad_absmax")[s, j], amax) < 1e-6
            else:
                assert np.isnan(t.metric("grad_absmax")[s, j])
            assert t.metric("grad_nonfinite")[s, j] == bad == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weight_update_and_loss(strategy, dtype):
    model = mlp(3, 32, d_in=16).to(dtype)
    x, y = torch.randn(64, 16, dtype=dtype), torch.randint(0, 10, (64,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-3)
    w = gradguard.watch(model, optimizer=opt, weights_every=2, strategy=strategy, activations_every=0)
    expect = []
    for _ in range(4):
        before = [p.detach().clone() for p in model.parameters()]
        loss = _train_step(model, opt, x, y, w)
        opt.step()
        after = [p.detach().clone() for p in model.parameters()]
        expect.append((loss.item(), before, after))
    w.close()
    t = w.trace
    layers = [m for m in model if isinstance(m, nn.Linear)]
    np.testing.assert_allclose(t.loss, [e[0] for e in expect], rtol=1e-6)
    assert t.loss_given.all()
    for s, (_, before, after) in enumerate(expect):
        for j in range(len(layers)):
            k = 2 * j  # weight, bias of layer j in parameters() order
            diffs = [a.double() - b.double() for a, b in zip(after[k : k + 2], before[k : k + 2])]
            wn, un = ref_norm(before[k : k + 2]), ref_norm(diffs)
            if s % 2 == 0:
                assert rel(t.metric("weight_norm")[s, j], wn) < 1e-6
                assert rel(t.metric("update_norm")[s, j], un) < 1e-5
                assert rel(t.metric("update_ratio")[s, j], un / wn) < 1e-5
            else:  # not a weight step: not measured, not zero
                assert np.isnan(t.metric("weight_norm")[s, j]) and np.isnan(t.metric("update_norm")[s, j])


def test_records_through_optimizer_hooks_without_step_calls():
    model = mlp(2, 16, d_in=8)
    x, y = torch.randn(32, 8), torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    norms = []
    with gradguard.watch(model, optimizer=opt, activations_every=0) as w:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            norms.append(ref_layer_grad(model[0])[0])
            opt.step()
    assert len(w.trace) == 3
    np.testing.assert_allclose(w.trace.metric("grad_norm")[:, 0], norms, rtol=1e-5)
    assert np.isnan(w.trace.loss).all() and not w.trace.loss_given.any()


def test_tied_weights_count_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.mid = nn.Linear(16, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight  # tied

        def forward(self, t):
            return self.head(torch.relu(self.mid(self.emb(t))))

    model = Tied()
    tokens = torch.randint(0, 50, (8, 5))
    with gradguard.watch(model, activations_every=0) as w:
        model(tokens).sum().backward()
        w.step()
    assert w.layers == ["emb", "mid"]  # head owns nothing of its own
    assert w.trace.meta["parameters"] == 50 * 16 + 16 * 16 + 16
    assert rel(w.trace.metric("grad_norm")[0, 0], float(model.emb.weight.grad.double().norm())) < 1e-6


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_missing_and_frozen_gradients_are_nan_not_zero(strategy):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

        def forward(self, x):
            return self.frozen(self.used(x))

    model = Branchy()
    with gradguard.watch(model, strategy=strategy, activations_every=0) as w:
        model(torch.randn(3, 4)).sum().backward()
        w.step()
    g = w.trace.metric("grad_norm")[0]
    assert g[0] > 0 and np.isnan(g[1]) and np.isnan(g[2])
    assert np.isnan(w.trace.metric("grad_nonfinite")[0, 1])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_amp_grad_scaler_statistics_are_unscaled(strategy):
    model = nn.Sequential(nn.Linear(256, 200), nn.ReLU(), nn.Linear(200, 10))
    x, y = torch.randn(16, 256), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    w = gradguard.watch(model, optimizer=opt, scaler=scaler, strategy=strategy, activations_every=0)
    refs = []
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        refs.append(ref_layer_grad(model[0])[0])
        w.step(loss=loss)
        scaler.step(opt)
        scaler.update()
    w.close()
    np.testing.assert_allclose(w.trace.metric("grad_norm")[:, 0], refs, rtol=1e-5)


def test_gradient_modified_after_backward_is_measured_as_it_is_at_step():
    model = nn.Sequential(nn.Linear(256, 200), nn.ReLU(), nn.Linear(200, 10))
    with gradguard.watch(model, strategy="hooks", activations_every=0) as w:
        model(torch.randn(8, 256)).sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # in place, after the hooks ran
        w.step()
    total = math.sqrt(np.nansum(w.trace.metric("grad_norm")[0] ** 2))
    assert rel(total, 1e-3) < 1e-4


def test_thirty_layer_sigmoid_first_layer_norm_below_fp32_range():
    model = mlp(30, 64, act=nn.Sigmoid, d_in=64)
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    with gradguard.watch(model, activations_every=0) as w:
        nn.functional.cross_entropy(model(x), y).backward()
        w.step()
    first = model[0]
    ref = ref_layer_grad(first)[0]
    naive = float(torch.sqrt(sum((p.grad * p.grad).sum() for p in first.parameters())))
    assert ref < 1e-15 and naive == 0.0  # fp32 squares underflow: a naive monitor reports exactly 0
    assert rel(w.trace.metric("grad_norm")[0, 0], ref) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_activation_statistics_and_sampling(dtype):
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)
    x = torch.randn(32, 8, dtype=dtype) * 5
    w = gradguard.watch(model, activations_every=3, flush_every=100)
    captured = {}
    hooks = [
        model[i].register_forward_hook(lambda m, i_, o, k=i: captured.__setitem__(k, o.detach())) for i in (1, 3, 4)
    ]
    outs = []
    for _ in range(7):
        model(x).float().sum().backward()
        outs.append(dict(captured))
        w.step()
    # between sampled steps gradguard has no hook on the model (only the test's own three)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 3
    w.close()
    for h in hooks:
        h.remove()
    t = w.trace
    sampled = [0, 3, 6]
    assert np.isnan(t.metric("act_mean")[[1, 2, 4, 5]]).all()
    for s in sampled:
        sig, relu, out = outs[s][1].double(), outs[s][3].double(), outs[s][4].double()
        np.testing.assert_allclose(t.metric("act_mean")[s], [sig.mean(), relu.mean(), out.mean()], rtol=1e-5)
        np.testing.assert_allclose(t.metric("act_std")[s], [sig.std(), relu.std(), out.std()], rtol=1e-4)
        sat = float(((sig <= 0.01) | (sig >= 0.99)).double().mean())
        assert t.metric("act_saturated")[s, 0] == pytest.approx(sat)
        assert np.isnan(t.metric("act_saturated")[s, 1])  # ReLU does not saturate
    # dead units: never active in any sampled batch of the window
    ever = torch.stack([(outs[s][3] > 0).any(0) for s in sampled]).any(0)
    assert t.metric("act_dead")[6, 1] == pytest.approx(1 - ever.double().mean().item())


def test_close_removes_every_hook_and_releases_the_model():
    model = nn.Sequential(nn.Linear(256, 200), nn.ReLU(), nn.Linear(200, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradguard.watch(model, optimizer=opt, activations_every=1)
    assert any(p._post_accumulate_grad_hooks for p in model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    w.step()
    w.close()
    w.close()  # twice is fine
    assert not any(m._forward_hooks for m in model.modules())
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    with pytest.raises(RuntimeError, match="closed"):
        w.step()
    ref = weakref.ref(model)
    del model, opt
    gc.collect()
    assert ref() is None
    assert len(w.trace) == 1  # the trace outlives the model


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_records_one_step_in_n(strategy):
    model = nn.Sequential(nn.Linear(256, 200), nn.ReLU(), nn.Linear(200, 10))
    norms = []
    with gradguard.watch(model, every=3, weights_every=6, activations_every=6, strategy=strategy) as w:
        for step in range(8):
            model.zero_grad()
            model(torch.randn(4, 256)).sum().backward()
            norms.append(ref_layer_grad(model[0])[0])
            # in-backward hooks measure only steps that will be recorded
            assert bool(w._grads._cache) == (step % 3 == 0 and w._grads.hooked > 0)
            w.step()
    assert w.trace.steps.tolist() == [0, 3, 6]  # training step numbers
    np.testing.assert_allclose(w.trace.metric("grad_norm")[:, 0], [norms[0], norms[3], norms[6]], rtol=1e-5)
    assert np.isnan(w.trace.metric("weight_norm")[1]).all() and not np.isnan(w.trace.metric("weight_norm")[2]).any()
    assert not np.isnan(w.trace.metric("act_std")[[0, 2], 0]).any() and np.isnan(w.trace.metric("act_std")[1]).all()


class NoParams(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: gradguard.watch(NoParams()), ValueError, "no parameters"),
        (lambda: gradguard.watch(nn.ReLU()), ValueError, "no parameters"),
        (lambda: gradguard.watch([nn.Linear(2, 2)]), TypeError, "nn.Module"),
        (lambda: gradguard.watch(nn.Linear(2, 2).parameters()), TypeError, "nn.Module"),
        (lambda: gradguard.watch(nn.Linear(2, 2), every=0), ValueError, "every must be a positive integer"),
        (lambda: gradguard.watch(nn.Linear(2, 2), every=1.5), ValueError, "every"),
        (lambda: gradguard.watch(nn.Linear(2, 2), activations_every=-1), ValueError, "activations_every"),
        (lambda: gradguard.watch(nn.Linear(2, 2), optimizer="adam"), TypeError, "optimizer"),
        (lambda: gradguard.watch(nn.Linear(2, 2), strategy="fast"), ValueError, "strategy"),
        (lambda: gradguard.watch(nn.Linear(2, 2), store="/nonexistent/dir/run.db"), ValueError, "does not exist"),
    ],
)
def test_bad_input_gets_a_clear_error(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_unwritable_store_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os

        if os.access(ro, os.W_OK):
            # root can write anywhere; a path under a regular file is unwritable for everyone
            target = tmp_path / "file.txt"
            target.write_text("x")
            path = target / "run.db"
        else:
            path = ro / "run.db"
        with pytest.raises(ValueError, match="cannot write store|does not exist"):
            gradguard.watch(nn.Linear(2, 2), store=path)
    finally:
        ro.chmod(0o700)


def test_existing_store_is_not_overwritten_silently(tmp_store):
    with gradguard.watch(nn.Linear(2, 2), store=tmp_store):
        pass
    with pytest.raises(FileExistsError, match="overwrite=True"):
        gradguard.watch(nn.Linear(2, 2), store=tmp_store)
    gradguard.watch(nn.Linear(2, 2), store=tmp_store, overwrite=True).close()
    other = tmp_store.with_name("notes.txt")
    other.write_text("my notes")
    with pytest.raises(ValueError, match="not a gradguard store"):
        gradguard.watch(nn.Linear(2, 2), store=other, overwrite=True)
    assert other.read_text() == "my notes"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_weights_changed_after_backward_are_measured_as_they_are_at_step(strategy):
    model = nn.Sequential(nn.Linear(256, 200), nn.ReLU(), nn.Linear(200, 10))
    with gradguard.watch(model, strategy=strategy, weights_every=1, activations_every=0) as w:
        for _ in range(2):
            model(torch.randn(4, 256)).sum().backward()
            with torch.no_grad():
                model[0].weight.mul_(2.0)  # after the in-backward hooks ran
            w.step()
    expect = ref_norm([model[0].weight, model[0].bias])
    assert rel(w.trace.metric("weight_norm")[1, 0], expect) < 1e-6


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sparse_embedding_gradient(strategy):
    model = nn.Sequential(nn.Embedding(100, 8, sparse=True), nn.Linear(8, 2))
    tokens = torch.tensor([[1, 2, 2, 5]])
    with gradguard.watch(model, strategy=strategy, activations_every=0) as w:
        for _ in range(2):  # a full step, then an ordinary one (its own path)
            model.zero_grad()
            model(tokens).sum().backward()
            assert model[0].weight.grad.is_sparse
            w.step()
    dense = model[0].weight.grad.to_dense().double()
    np.testing.assert_allclose(w.trace.metric("grad_norm")[:, 0], float(dense.norm()), rtol=1e-6)
    assert rel(w.trace.metric("grad_absmax")[0, 0], float(dense.abs().max())) < 1e-6
    assert np.isnan(w.trace.metric("grad_absmax")[1, 0])


def test_a_skipped_optimizer_step_does_not_misplace_update_norms():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.watch(model, optimizer=opt, weights_every=2, activations_every=0) as w:
        for step in range(4):
            opt.zero_grad()
            model(torch.randn(4, 8)).sum().backward()
            w.step()
            if step != 0:  # step 0 (a weight step) never reaches the optimizer, as under a GradScaler skip
                opt.step()
    upd = w.trace.metric("update_norm")
    assert np.isnan(upd[0]).all()  # no optimizer step happened at step 0
    assert np.isnan(upd[1]).all() and np.isnan(upd[3]).all()  # not weight steps
    assert (upd[2] > 0).all()  # the weight step whose optimizer step did happen

"""GradguardCallback in real Lightning Trainers on CPU, against gradients recomputed without Lightning."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gradguard
from gradguard.integrations.lightning import GradguardCallback

N, D_IN, D_OUT = 64, 6, 3


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, D_OUT)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, D_IN, generator=g, dtype=torch.float64), torch.randint(0, D_OUT, (N,), generator=g)


def _loader(batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(*_data()), batch_size=batch_size, shuffle=False)


class Module(L.LightningModule):
    """A small float64 classifier; ``nan_batch`` poisons that batch's loss; keeps what the hooks saw."""

    def __init__(self, optimizer: str = "sgd", nan_batch: int | None = None) -> None:
        super().__init__()
        self.net = _net()
        self.optimizer_name = optimizer
        self.nan_batch = nan_batch
        self.clipped: list[list[torch.Tensor]] = []
        self.params_before: list[list[torch.Tensor]] = []
        self.params_after: list[list[torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if batch_idx == self.nan_batch:
            loss = loss * float("nan")
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        self.params_before.append([p.detach().clone() for p in self.parameters()])

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.params_after.append([p.detach().clone() for p in self.parameters()])

    def on_before_optimizer_step(self, optimizer):
        # The LightningModule's hook runs after the callbacks': it sees the gradients as clipped.
        self.clipped.append([p.grad.clone() for p in self.parameters() if p.grad is not None])

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=0.01, fused=self.optimizer_name == "adam_fused")


def _trainer(callbacks, max_steps: int, **kwargs) -> L.Trainer:
    kwargs.setdefault("logger", False)
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, callbacks=callbacks, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )


def _layer_norms(net: nn.Module) -> list[float]:
    """float64 per-layer gradient norms of the Linear layers (weight and bias together)."""
    out = []
    for m in net:
        if isinstance(m, nn.Linear):
            out.append(float(torch.cat([m.weight.grad.reshape(-1), m.bias.grad.reshape(-1)]).norm()))
    return out


def test_one_row_per_optimizer_step_with_accumulation_and_clipping(tmp_path):
    steps, batch, accumulate, max_norm = 5, 4, 2, 0.05
    module = Module()
    reference = copy.deepcopy(module.net)  # the same initial weights, trained below without Lightning
    cb = GradguardCallback(clip=max_norm, weights_every=1, flush_every=2, activations_every=0)
    logger = L.loggers.CSVLogger(str(tmp_path), name="run")
    trainer = _trainer([cb], steps, accumulate_grad_batches=accumulate, logger=logger, log_every_n_steps=1)
    trainer.fit(module, _loader(batch))

    # Lightning's loop replayed by hand: each batch's loss divided by the accumulation count,
    # gradients accumulated, clipped by torch's clip_grad_norm_, then SGD with momentum.
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    norms, totals, losses, clipped, updates = [], [], [], [], []
    for step in range(steps):
        opt.zero_grad()
        loss = 0.0
        for micro in range(accumulate):
            rows = slice((step * accumulate + micro) * batch, (step * accumulate + micro + 1) * batch)
            part = nn.functional.cross_entropy(reference(x[rows]), y[rows]) / accumulate
            part.backward()
            loss += float(part)
        norms.append(_layer_norms(reference))
        losses.append(loss)
        totals.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)))
        clipped.append([p.grad.clone() for p in reference.parameters()])
        before = [p.detach().clone() for p in reference.parameters()]
        opt.step()
        updates.append([float(torch.cat([(p - b).reshape(-1) for p, b in zip(reference[i].parameters(),
                        before[2 * k: 2 * k + 2])]).norm()) for k, i in enumerate((0, 2, 4))])

    trace = cb.trace
    assert trainer.global_step == steps
    assert list(trace.steps) == list(range(steps))  # one row per optimizer step, not per batch
    assert trace.layers == ["net.0", "net.2", "net.4"]
    np.testing.assert_allclose(trace.metric("grad_norm"), norms, rtol=1e-10)  # before clipping
    np.testing.assert_allclose(trace.loss, losses, rtol=1e-10)  # the accumulated batches' mean loss
    np.testing.assert_allclose(trace.metric("update_norm"), updates, rtol=1e-8)
    assert max(totals) > max_norm  # clipping did act
    for seen, expected in zip(module.clipped, clipped):  # the optimizer got torch's clipped gradients
        for a, b in zip(seen, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    for p, q in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)
    # The logged norm is the pre-clip total norm, once per optimizer step.
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        logged = [float(r["gradguard/grad_norm"]) for r in csv.DictReader(f) if r.get("gradguard/grad_norm")]
    np.testing.assert_allclose(logged, totals, rtol=1e-10)
    assert float(trainer.callback_metrics["gradguard/grad_norm"]) == pytest.approx(totals[-1], rel=1e-10)


def test_clip_norm_is_logged_on_the_trainers_logging_steps_only(tmp_path):
    # pl_module.log costs ~0.5 ms a call: the pre-clip norm is logged on the steps the Trainer
    # writes (log_every_n_steps), with that step's value, and not computed into logs on the others.
    steps, every, max_norm = 7, 3, 0.05
    module = Module()
    reference = copy.deepcopy(module.net)
    calls = []
    log = module.log

    def counting_log(name, value, *args, **kwargs):
        if name == "gradguard/grad_norm":
            calls.append(float(value))
        return log(name, value, *args, **kwargs)

    module.log = counting_log
    logger = L.loggers.CSVLogger(str(tmp_path), name="run")
    cb = GradguardCallback(clip=max_norm, activations_every=0)
    trainer = _trainer([cb], steps, logger=logger, log_every_n_steps=every)
    trainer.fit(module, _loader(8))

    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    totals = []
    for step in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(reference(x[step * 8 : step * 8 + 8]), y[step * 8 : step * 8 + 8]).backward()
        totals.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)))
        opt.step()
    logging_steps = [s for s in range(steps) if (s + 1) % every == 0]  # Lightning counts steps from 1
    np.testing.assert_allclose(calls, [totals[s] for s in logging_steps], rtol=1e-10)
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("gradguard/grad_norm")]
    logged = {int(r["step"]): float(r["gradguard/grad_norm"]) for r in rows}
    assert sorted(logged) == logging_steps
    np.testing.assert_allclose([logged[s] for s in logging_steps], [totals[s] for s in logging_steps], rtol=1e-10)
    assert len(cb.trace) == steps  # the Trace still has every step


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adam_fused"])
def test_guard_skips_the_step_with_a_nan_loss(optimizer):
    bad, steps = 3, 6
    module = Module(optimizer, nan_batch=bad)
    cb = GradguardCallback(guard=True, flush_every=2, activations_every=0)
    trainer = _trainer([cb], steps)
    with pytest.warns(UserWarning) as record:
        trainer.fit(module, _loader(8))
    messages = [str(w.message) for w in record]

    assert all(torch.isfinite(p).all() for p in module.parameters())
    for i in range(steps):  # the bad step left every parameter as it was; every other step moved them
        same = all(torch.equal(a, b) for a, b in zip(module.params_before[i], module.params_after[i]))
        assert same == (i == bad), i
    if optimizer != "sgd":  # Adam's state did not count the skipped step either
        state = trainer.optimizers[0].state[next(module.parameters())]
        assert int(state["step"]) == steps - 1
    assert [e.step for e in cb.guard.events if e.kind == "step_skipped"] == [bad]
    assert float(trainer.callback_metrics["gradguard/skipped_steps"]) == 1
    assert float(trainer.callback_metrics["gradguard/findings"]) == len(cb.findings) >= 1
    assert any(f.kind == "nonfinite" and f.step == bad for f in cb.findings)
    assert any("step_skipped" in m and f"step {bad}" in m for m in messages)
    assert any("nonfinite" in m for m in messages)
    assert len(cb.trace) == steps and np.isnan(cb.trace.loss[bad])


def test_guard_and_clip_read_the_gradients_once_and_name_the_bad_layer(monkeypatch):
    # With clip=max_norm and a guard, the guard's non-finite check uses the norms the clip needs
    # (one _foreach_norm per step, not two), and still names the layer whose gradient went bad.
    bad, steps, max_norm = 2, 5, 0.05

    class Poisoned(Module):
        def on_after_backward(self):
            if self.global_step == bad:
                self.net[2].weight.grad[0, 0] = float("inf")

    module = Poisoned()
    calls = []
    foreach_norm = torch._foreach_norm

    def counting(tensors, *args, **kwargs):
        calls.append(len(tensors))
        return foreach_norm(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", counting)
    cb = GradguardCallback(clip=max_norm, guard=True, activations_every=0)
    trainer = _trainer([cb], steps)
    with pytest.warns(UserWarning, match="step_skipped"):
        trainer.fit(module, _loader(8))

    assert calls == [6] * steps  # the six gradients, once per step (the skipped one too: then no clip)
    (event,) = [e for e in cb.guard.events if e.kind == "step_skipped"]
    assert event.step == bad and event.layers == ["net.2"] and event.loss_finite
    for i in range(steps):
        same = all(torch.equal(a, b) for a, b in zip(module.params_before[i], module.params_after[i]))
        assert same == (i == bad), i
    pre = np.sqrt(np.nansum(cb.trace.metric("grad_norm") ** 2, axis=1))  # the recorded, pre-clip norms
    for i, grads in enumerate(module.clipped):
        if i == bad:
            assert grads == []  # the guard dropped every gradient: the optimizer left the step out
            continue
        total = float(torch.cat([g.reshape(-1) for g in grads]).norm())
        assert total == pytest.approx(min(pre[i], max_norm), rel=1e-4)  # torch divides by (total + 1e-6)
    assert pre[[i for i in range(steps) if i != bad]].min() > max_norm  # every clean step was clipped


def test_amp_statistics_are_of_unscaled_gradients():
    class Capture(Module):
        def __init__(self):
            super().__init__()
            self.net = self.net.float()
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x.float()), y)
            self.losses.append(float(loss))
            return loss

    module = Capture()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    cb = GradguardCallback(flush_every=2, activations_every=0)
    plugin = L.plugins.MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = _trainer([cb], 3, plugins=[plugin])
    trainer.fit(module, _loader(8))
    # The module's hook runs after unscale_ (and nothing clips here): the true gradients.
    expected = []
    for grads in module.clipped:
        expected.append([float(torch.cat([w.reshape(-1), b.reshape(-1)]).double().norm())
                         for w, b in zip(grads[0::2], grads[1::2])])
    np.testing.assert_allclose(cb.trace.metric("grad_norm"), expected, rtol=1e-6)
    np.testing.assert_allclose(cb.trace.loss, module.losses, rtol=1e-6)  # not multiplied by the scale


def test_autoclip_instance_and_store(tmp_path):
    clip = gradguard.AutoClip(percentile=50)
    cb = GradguardCallback(clip=clip, store=tmp_path / "run.db", flush_every=3, activations_every=2)
    trainer = _trainer([cb], 4)
    trainer.fit(Module(), _loader(8))
    assert int(clip._seen) == 4  # the clipper ran once per optimizer step
    stored = gradguard.load(tmp_path / "run.db")
    np.testing.assert_array_equal(stored.metric("grad_norm"), cb.trace.metric("grad_norm"))
    assert np.isfinite(stored.metric("act_std")[0]).all() and np.isnan(stored.metric("act_std")[1]).all()
    assert cb.state_dict()["clip"]["seen"] == clip._seen  # checkpointed with the Trainer's callbacks


def test_clip_with_gradient_clip_val_is_refused():
    cb = GradguardCallback(clip=1.0)
    trainer = _trainer([cb], 2, gradient_clip_val=0.5)
    with pytest.raises(ValueError, match="gradient_clip_val"):
        trainer.fit(Module(), _loader(8))


def test_guard_alone_works_with_lightning_clipping():
    cb = GradguardCallback(guard=True, activations_every=0)
    trainer = _trainer([cb], 3, gradient_clip_val=0.01)
    module = Module()
    trainer.fit(module, _loader(8))
    for grads in module.clipped[:1]:  # Lightning clips after the module's hook: these are unclipped
        assert float(torch.cat([g.reshape(-1) for g in grads]).norm()) > 0.01
    assert len(cb.trace) == 3 and cb.guard.skipped == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"clip": "1.0"}, TypeError, "clip must be"),
        ({"clip": -1.0}, ValueError, "must be positive"),
        ({"clip": True}, TypeError, "clip must be"),
        ({"guard": "sometimes"}, ValueError, "guard must be"),
        ({"every": 0}, ValueError, "every must be a positive integer"),
        ({"flush_every": 1.5}, ValueError, "flush_every"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradguardCallback(**kwargs)


def test_trace_before_fit_says_why():
    with pytest.raises(RuntimeError, match="trainer.fit"):
        _ = GradguardCallback().trace


@pytest.mark.slow  # a fresh interpreter importing gradguard
def test_import_gradguard_does_not_import_lightning():
    code = "import sys, gradguard; sys.exit(any(m in sys.modules for m in ('lightning', 'pytorch_lightning')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- DDP: two real processes on gloo ---------------------------------------------------------


class RankFile:
    """A sink that leaves one file per rank it was called on (picklable, for ddp_spawn)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def write(self, rows, findings) -> None:
        import torch.distributed as dist

        with open(os.path.join(self.folder, f"sink-rank{dist.get_rank()}.txt"), "a") as f:
            f.write(f"{len(rows)}\n")


class ShardedModule(Module):
    """Rank r trains on rows r, r+2, r+4, ... in order (so a step's two shards are consecutive rows)."""

    def train_dataloader(self):
        sampler = DistributedSampler(TensorDataset(*_data()), num_replicas=2, rank=self.global_rank, shuffle=False)
        return DataLoader(TensorDataset(*_data()), batch_size=4, sampler=sampler)


@pytest.mark.slow
def test_ddp_two_processes_global_norms_and_rank_zero_store(tmp_path):
    steps, per_rank = 4, 4
    store = tmp_path / "run.db"
    cb = GradguardCallback(store=store, sinks=[RankFile(str(tmp_path))], weights_every=1, flush_every=2)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=steps, callbacks=[cb],
        use_distributed_sampler=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, logger=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers and the like
        trainer.fit(ShardedModule())

    # One process on the full batch: rank r's k-th batch holds rows 8k + r + 2j, so the
    # two together are rows 8k .. 8k+7; DDP averages the two equal-sized batch means.
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    expected = []
    for step in range(steps):
        opt.zero_grad()
        rows = slice(step * 2 * per_rank, (step + 1) * 2 * per_rank)
        nn.functional.cross_entropy(net(x[rows]), y[rows]).backward()
        expected.append(_layer_norms(net))
        opt.step()
    stored = gradguard.load(store)
    assert list(stored.steps) == list(range(steps))
    np.testing.assert_allclose(stored.metric("grad_norm"), expected, rtol=1e-6)
    assert sorted(p.name for p in tmp_path.glob("sink-rank*")) == ["sink-rank0.txt"]  # rank 0 only
    assert (tmp_path / "sink-rank0.txt").read_text().split() == ["2", "2"]


# -- FSDP1 (Lightning's FSDPStrategy) on CPU: a launched script, as Lightning runs FSDP ---------

FSDP_SCRIPT = '''
import sys, numpy as np, torch, lightning.pytorch as L
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from lightning.pytorch.strategies import FSDPStrategy
from gradguard.integrations.lightning import GradguardCallback

torch.set_num_threads(1)


class CPUFSDP(FSDPStrategy):
    """Lightning refuses FSDPStrategy itself on CPU; the model is wrapped in configure_model."""


class M(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).double()

    def configure_model(self):
        # torch's FSDP needs device_id on CPU, which Lightning does not pass there.
        self.net = FSDP(self.net, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), device_id=torch.device("cpu"),
                        use_orig_params=sys.argv[2] == "1")

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 6, generator=g, dtype=torch.float64)
        ds = TensorDataset(x, torch.randint(0, 3, (64,), generator=g))
        return DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, 2, self.global_rank, shuffle=False))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


cb = GradguardCallback(flush_every=2, weights_every=1, activations_every=0)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=CPUFSDP(process_group_backend="gloo"), max_steps=4,
                    callbacks=[cb], use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
trainer.fit(M())
np.save(f"{sys.argv[1]}/rank{trainer.global_rank}.npy", np.stack([cb.trace.metric(m) for m in
        ("grad_norm", "grad_absmax", "weight_norm", "update_norm")]))
trainer.strategy.barrier()  # both files are written before either rank leaves
torch.distributed.destroy_process_group()
from ranks import leave  # exit without interpreter shutdown: see tests/ranks.py
leave()
'''


@pytest.mark.slow
@pytest.mark.parametrize("use_orig_params", [True, False])
def test_fsdp1_per_layer_norms_are_global(tmp_path, use_orig_params):
    script = tmp_path / "fsdp_run.py"
    script.write_text(FSDP_SCRIPT)
    tests = str(Path(__file__).resolve().parents[1])  # for ranks.py, in this process and Lightning's rank 1
    path = os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    run = subprocess.run([sys.executable, str(script), str(tmp_path), str(int(use_orig_params))], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [np.load(tmp_path / f"rank{r}.npy") for r in range(2)]
    np.testing.assert_array_equal(ranks[0], ranks[1])  # every rank holds the global values

    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    expected: dict[str, list[list[float]]] = {"grad_norm": [], "grad_absmax": [], "weight_norm": [], "update_norm": []}
    linears = [m for m in net if isinstance(m, nn.Linear)]
    for step in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[step * 8 : step * 8 + 8]), y[step * 8 : step * 8 + 8]).backward()
        expected["grad_norm"].append(_layer_norms(net))
        expected["grad_absmax"].append([float(torch.cat([m.weight.grad.reshape(-1), m.bias.grad.reshape(-1)])
                                              .abs().max()) for m in linears])
        before = [torch.cat([m.weight.reshape(-1), m.bias.reshape(-1)]).detach().clone() for m in linears]
        expected["weight_norm"].append([float(b.norm()) for b in before])
        opt.step()
        expected["update_norm"].append([float((torch.cat([m.weight.reshape(-1), m.bias.reshape(-1)]) - b).norm())
                                        for m, b in zip(linears, before)])
    # 1e-6: FSDP's sharded gradient reduction differs from one process by ~1.2e-7 relative here (a
    # shard left out would be off by tens of percent).
    for i, metric in enumerate(expected):
        np.testing.assert_allclose(ranks[0][i], expected[metric], rtol=1e-6, err_msg=metric)


def test_overhead_benchmark_variants_differ_only_as_named(monkeypatch):
    # benchmarks/overhead_lightning.py compares Trainers that must differ only by the variant's
    # callback or clipping (a "Lightning clipping" variant that did not clip once timed the bare fit).
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import overhead_lightning as bench

    def trainer(variant):
        t = bench.trainer_for(variant, steps=1, timer=bench.StepTimer())
        return t.gradient_clip_val, [type(c).__name__ for c in t.callbacks if isinstance(c, GradguardCallback)]

    assert trainer("bare") == trainer("bare_again") == (None, [])
    assert trainer("lightning_clip") == (1.0, [])
    assert trainer("gradguard") == (None, ["GradguardCallback"])
    guarded = bench.trainer_for("guarded", steps=1, timer=bench.StepTimer())
    (cb,) = [c for c in guarded.callbacks if isinstance(c, GradguardCallback)]
    assert guarded.gradient_clip_val is None and cb.clip == 1.0 and cb.policy is not None

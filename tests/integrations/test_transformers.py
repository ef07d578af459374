"""GradguardCallback in a real Hugging Face Trainer: a tiny GPT-2 built from a config, generated token ids, CPU."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import gradguard
from gradguard.integrations.transformers import GradguardCallback


def tiny_gpt2() -> GPT2LMHeadModel:
    # initializer_range 0.2: the gradient norm is about 2, so max_grad_norm=1.0 really clips.
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                        bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    return GPT2LMHeadModel(config)


def token_data(n: int = 48, length: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 100, (length,), generator=g)
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def training_args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                disable_tqdm=True, per_device_train_batch_size=4, max_steps=6, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def layer_norms(grads: dict[str, torch.Tensor], layers: list[str]) -> np.ndarray:
    """float64 per-layer norms from {parameter name: gradient}, a layer being the module owning the parameter."""
    sq = dict.fromkeys(layers, 0.0)
    for name, g in grads.items():
        sq[name.rpartition(".")[0] or "(root)"] += float(g.double().pow(2).sum())
    return np.sqrt([sq[layer] for layer in layers])


class NaNLossAt(Trainer):
    """A Trainer whose loss is NaN at one optimizer step (global_step == nan_step)."""

    nan_step = 2

    def compute_loss(self, model, inputs, **kwargs):
        loss = super().compute_loss(model, inputs, **kwargs)
        return loss * math.nan if self.state.global_step == self.nan_step else loss


class StepWatcher(TrainerCallback):
    """Whether each optimizer step changed the parameters, and the gradients the optimizer got."""

    def __init__(self, model):
        self.model = model
        self.changed: list[bool] = []
        self.stepped_grads: list[dict[str, torch.Tensor]] = []
        self._before: list[torch.Tensor] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._before = [p.detach().clone() for p in self.model.parameters()]
        self.stepped_grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters()})

    def on_optimizer_step(self, args, state, control, **kwargs):
        now = list(self.model.parameters())
        self.changed.append(any(not torch.equal(a, b) for a, b in zip(self._before, now)))


def test_one_row_per_optimizer_step_with_the_gradients_before_clipping(tmp_path, monkeypatch):
    model = tiny_gpt2()
    args = training_args(tmp_path, gradient_accumulation_steps=2, max_grad_norm=1.0, max_steps=6)
    trainer = Trainer(model=model, args=args, train_dataset=token_data())
    cb = GradguardCallback(weights_every=3).attach(trainer)

    # What the Trainer's clipping receives: captured inside torch, below Accelerate and gradguard.
    before_clip: list[dict[str, torch.Tensor]] = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *a, **k):
        parameters = list(parameters)
        before_clip.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        return real_clip(parameters, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    watcher = StepWatcher(model)
    trainer.add_callback(watcher)
    trainer.train()

    trace = cb.trace
    assert trainer.state.global_step == 6 and len(before_clip) == 6
    assert trace.steps.tolist() == list(range(6))  # one row per optimizer step, not per micro-batch
    expected = np.stack([layer_norms(g, trace.layers) for g in before_clip])
    np.testing.assert_allclose(trace.metric("grad_norm"), expected, rtol=1e-5)
    totals = np.sqrt((expected**2).sum(axis=1))
    assert (totals > 1.0).all()  # max_grad_norm=1.0 clipped every step...
    clipped = np.stack([layer_norms(g, trace.layers) for g in watcher.stepped_grads])
    assert (np.sqrt((clipped**2).sum(axis=1)) < 1.0 + 1e-5).all()  # ...and the optimizer got the clipped ones

    # The loss of each step is the Trainer's (the mean over its two micro-batches), step by step.
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == list(range(1, 7))
    np.testing.assert_allclose(trace.loss, [h["loss"] for h in logged], rtol=1e-6)
    assert trace.loss_given.all()
    # The logs carry gradguard's pre-clip numbers, and they agree with the Trainer's own grad_norm.
    np.testing.assert_allclose([h["gradguard/grad_norm"] for h in logged], [h["grad_norm"] for h in logged], rtol=1e-5)
    layer = trace.layers[2]
    np.testing.assert_allclose([h[f"gradguard/grad_norm/{layer}"] for h in logged], expected[:, 2], rtol=1e-5)
    # Update sizes come from the optimizer's hooks on weight steps (0 and 3).
    assert (trace.metric("update_norm")[[0, 3]] > 0).all() and np.isnan(trace.metric("update_norm")[[1, 2]]).all()


def test_store_holds_every_step_and_is_current_at_each_log(tmp_path):
    store = tmp_path / "run.db"
    rows_at_log: list[tuple[int, int]] = []

    class ReadStore(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                rows_at_log.append((state.global_step, len(gradguard.load(store))))

    trainer = Trainer(model=tiny_gpt2(), args=training_args(tmp_path, logging_steps=3, max_steps=7),
                      train_dataset=token_data(), callbacks=[ReadStore()])
    cb = GradguardCallback(store=store, flush_every=50).attach(trainer)
    trainer.train()
    assert rows_at_log == [(3, 3), (6, 6)]
    assert gradguard.load(store).steps.tolist() == list(range(7)) == cb.trace.steps.tolist()


@pytest.mark.parametrize("guard", [True, False])
def test_nan_loss_is_recorded_reported_and_guarded(tmp_path, guard):
    model = tiny_gpt2()
    trainer = NaNLossAt(model=model, args=training_args(tmp_path, max_steps=5, logging_steps=5),
                        train_dataset=token_data())
    cb = GradguardCallback(guard=guard).attach(trainer)
    watcher = StepWatcher(model)
    trainer.add_callback(watcher)
    with pytest.warns(UserWarning, match="the loss is nan at step 2"):
        trainer.train()

    trace = cb.trace
    assert len(trace) == 5
    assert np.isnan(trace.loss[2]) and trace.loss_given[2]
    assert np.isfinite(trace.loss[:2]).all()
    assert any(f.kind == "nonfinite" and f.layer is None and f.step == 2 for f in cb.findings)
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert math.isfinite(log["loss"])  # the Trainer's own log hides the NaN...
    assert math.isnan(log["gradguard/loss"])  # ...gradguard's does not
    assert log["gradguard/nonfinite_loss_steps"] == (1 if guard else 3)
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if guard:
        assert finite and np.isfinite(trace.loss[3:]).all()
        assert watcher.changed == [True, True, False, True, True]  # only the NaN step was skipped
        assert cb.guard.skipped == 1 and log["gradguard/skipped_steps"] == 1
    else:
        assert not finite and np.isnan(trace.loss[3:]).all()  # what the guard prevents


@pytest.mark.parametrize("clip", ["max_norm", "autoclip"])
def test_gradguard_clips_in_place_of_the_trainer(tmp_path, clip):
    model = tiny_gpt2()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_grad_norm=0.0, max_steps=5),
                      train_dataset=token_data())
    clipper = 0.5 if clip == "max_norm" else gradguard.AutoClip(percentile=50)
    twin = None if clip == "max_norm" else gradguard.AutoClip(percentile=50)
    cb = GradguardCallback(clip=clipper).attach(trainer)
    before_clip: list[dict[str, torch.Tensor]] = []
    inner = trainer.accelerator.clip_grad_norm_

    def spy(parameters, max_norm, *a, **k):  # outside gradguard's wrapper: sees the gradients it gets
        before_clip.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        return inner(parameters, max_norm, *a, **k)

    trainer.accelerator.clip_grad_norm_ = spy
    watcher = StepWatcher(model)
    trainer.add_callback(watcher)
    trainer.train()

    assert len(before_clip) == len(watcher.stepped_grads) == 5
    for pre, post in zip(before_clip, watcher.stepped_grads):
        ref = {n: torch.nn.Parameter(torch.zeros_like(g)) for n, g in pre.items()}
        for n, g in pre.items():
            ref[n].grad = g.clone()
        if twin is None:
            total = torch.nn.utils.clip_grad_norm_(list(ref.values()), 0.5)
            assert total > 0.5  # it did clip
        else:
            twin(list(ref.values()))
        for n in pre:
            assert torch.equal(post[n], ref[n].grad), n
    # The Trainer still logs the pre-clip norm, which gradguard recorded too.
    logged = [h["grad_norm"] for h in trainer.state.log_history if "loss" in h]
    np.testing.assert_allclose(logged, np.sqrt((cb.trace.metric("grad_norm") ** 2).sum(axis=1)), rtol=1e-5)


def test_clip_with_the_trainers_max_grad_norm_says_which_one_applies(tmp_path):
    trainer = Trainer(model=tiny_gpt2(), args=training_args(tmp_path, max_grad_norm=1.0, max_steps=1),
                      train_dataset=token_data())
    GradguardCallback(clip=0.5).attach(trainer)
    with pytest.warns(UserWarning, match="replaces the Trainer's clipping; max_grad_norm=1.0 is not applied"):
        trainer.train()


def test_logs_reach_report_to_integrations(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = training_args(tmp_path, report_to=["tensorboard"], logging_steps=2, max_steps=4)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=token_data())
    cb = GradguardCallback(log_metrics=("grad_norm", "weight_norm")).attach(trainer)
    trainer.train()
    events = [EventAccumulator(str(p.parent)).Reload() for p in (tmp_path / "out").rglob("events.out.tfevents.*")]
    tags = {t for acc in events for t in acc.Tags()["scalars"]}
    layer = cb.trace.layers[0]
    for tag in ("train/gradguard/loss", "train/gradguard/grad_norm", f"train/gradguard/grad_norm/{layer}",
                f"train/gradguard/weight_norm/{layer}", "train/gradguard/findings"):
        assert tag in tags
    grad = next(acc for acc in events if f"train/gradguard/grad_norm/{layer}" in acc.Tags()["scalars"])
    written = [e.value for e in grad.Scalars(f"train/gradguard/grad_norm/{layer}")]
    np.testing.assert_allclose(written, cb.trace.metric("grad_norm")[[1, 3], 0], rtol=1e-6)


def test_a_callback_passed_without_attach_says_how_to_attach(tmp_path):
    trainer = Trainer(model=tiny_gpt2(), args=training_args(tmp_path, max_steps=1), train_dataset=token_data(),
                      callbacks=[GradguardCallback()])
    with pytest.raises(RuntimeError, match=r"call cb.attach\(trainer\)"):
        trainer.train()


def test_bad_options_are_refused_at_construction():
    with pytest.raises(ValueError, match="every must be a positive integer"):
        GradguardCallback(every=0)
    with pytest.raises(ValueError, match="clip as a number"):
        GradguardCallback(clip=-1.0)
    with pytest.raises(ValueError, match="guard must be"):
        GradguardCallback(guard="sometimes")
    with pytest.raises(ValueError, match="log_metrics"):
        GradguardCallback(log_metrics=("gradnorm",))
    with pytest.raises(TypeError, match="transformers.Trainer"):
        GradguardCallback().attach(torch.nn.Linear(2, 2))


@pytest.mark.slow  # a fresh interpreter importing gradguard
def test_transformers_is_imported_only_by_the_integration():
    code = (
        "import sys, gradguard, gradguard.integrations\n"
        "assert 'transformers' not in sys.modules\n"
        "sys.modules['transformers'] = None  # as if it were not installed\n"
        "try:\n"
        "    import gradguard.integrations.transformers\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'gradguard[transformers]'" in out.stdout

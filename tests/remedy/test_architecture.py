"""Architecture fixes and weight penalties: structure, numbers, copies, state_dict, torch.compile, errors."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from conftest import mlp, ref_norm
from torch import nn
from torch.nn import functional as F

from gradguard.remedy.architecture import (
    InputStandardizer,
    Residual,
    insert_normalization,
    prepend_standardizer,
    residualize,
    swap_activation,
)
from gradguard.remedy.regularize import l1_penalty, l2_penalty

# ------------------------------------------------------------------------------------------------ helpers


def _nested_sigmoid() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 16), nn.Sigmoid(), nn.Sequential(nn.Linear(16, 16), nn.Sigmoid()), nn.Linear(16, 4)
    )


def _snapshot(model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    return repr(model), {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, snapshot: tuple[str, dict[str, torch.Tensor]]) -> None:
    structure, state = snapshot
    assert repr(model) == structure
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def _check_copy_roundtrip_compile(
    build: Callable[[], nn.Module], transform: Callable[[nn.Module], nn.Module], x: torch.Tensor
) -> nn.Module:
    """Shape kept, original untouched, state_dict loads into a fresh copy, compiled == eager; returns the result."""
    torch.manual_seed(1)
    original = build()
    original.eval()
    before = _snapshot(original)
    out_before = original(x)
    result = transform(original)
    assert result is not original
    _assert_unchanged(original, before)
    assert torch.equal(original(x), out_before)

    result.train()
    result(x)  # moves BatchNorm running statistics away from their defaults, so the round trip carries them
    with torch.no_grad():
        for p in result.parameters():  # e.g. Residual.alpha away from 0: the round trip must carry every value
            p.add_(0.1 * torch.randn_like(p))
    result.eval()
    y = result(x)
    assert y.shape == out_before.shape

    torch.manual_seed(2)
    fresh = transform(build())
    fresh.eval()
    assert not torch.allclose(fresh(x), y)  # a different model until the state is loaded
    fresh.load_state_dict(result.state_dict())
    assert torch.equal(fresh(x), y)

    compiled = torch.compile(result, backend="aot_eager")
    torch.testing.assert_close(compiled(x), y, atol=1e-5, rtol=1e-5)
    return result


def _first_last_ratio(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return ref_norm([linears[0].weight.grad]) / ref_norm([linears[-1].weight.grad])


# --------------------------------------------------------------------------------------------- swap_activation


def test_swap_activation_replaces_every_instance_like_a_manual_swap():
    model = _nested_sigmoid()
    x = torch.randn(5, 8)
    swapped = swap_activation(model, nn.Sigmoid, nn.ReLU)

    assert not any(isinstance(m, nn.Sigmoid) for m in swapped.modules())
    assert sum(isinstance(m, nn.ReLU) for m in swapped.modules()) == 2
    expected = copy.deepcopy(model)
    expected[1] = nn.ReLU()
    expected[2][1] = nn.ReLU()
    assert torch.equal(swapped(x), expected(x))
    assert not torch.allclose(swapped(x), model(x))  # the original still has its sigmoids


def test_swap_activation_copy_roundtrip_compile_with_a_factory():
    x = torch.randn(6, 8)
    result = _check_copy_roundtrip_compile(
        _nested_sigmoid, lambda m: swap_activation(m, nn.Sigmoid, lambda: nn.PReLU(init=0.1)), x
    )
    prelus = [m for m in result.modules() if isinstance(m, nn.PReLU)]
    assert len(prelus) == 2


def test_swap_activation_gives_each_replacement_its_own_module():
    shared = nn.Tanh()
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.Linear(4, 4), shared)
    swapped = swap_activation(model, nn.Tanh, nn.PReLU)
    assert isinstance(swapped[1], nn.PReLU) and isinstance(swapped[3], nn.PReLU)
    assert swapped[1] is not swapped[3]
    assert model[1] is shared and model[3] is shared


def test_swap_activation_inplace_modifies_the_model():
    model = _nested_sigmoid()
    out = swap_activation(model, nn.Sigmoid, nn.Tanh, inplace=True)
    assert out is model
    assert isinstance(model[1], nn.Tanh) and isinstance(model[2][1], nn.Tanh)


def test_swap_activation_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"no nn\.Sigmoid modules in the model"):
        swap_activation(mlp(2, 4, nn.ReLU), nn.Sigmoid, nn.ReLU)
    with pytest.raises(TypeError, match=r"not a module instance"):
        swap_activation(_nested_sigmoid(), nn.Sigmoid, nn.ReLU())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nn\.Module class"):
        swap_activation(_nested_sigmoid(), "sigmoid", nn.ReLU)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- insert_normalization


def _nested_mixed() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.Tanh(),
        nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
        nn.Linear(16, 16),  # followed by a Linear, not an activation: left alone
        nn.Linear(16, 4),
    )


@pytest.mark.parametrize("kind, norm", [("batch", nn.BatchNorm1d), ("layer", nn.LayerNorm)])
def test_insert_normalization_structure(kind, norm):
    result = insert_normalization(_nested_mixed(), kind)
    assert [type(m) for m in result] == [nn.Linear, norm, nn.Tanh, nn.Sequential, nn.Linear, nn.Linear]
    assert [type(m) for m in result[3]] == [nn.Linear, norm, nn.ReLU]
    width = result[1].num_features if kind == "batch" else result[1].normalized_shape[0]
    assert width == 16
    assert list(result._modules) == [str(i) for i in range(6)]  # indices stay contiguous


def test_insert_normalization_convolutions_and_named_sequentials():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 1))
    result = insert_normalization(conv, "batch")
    assert [type(m) for m in result] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    assert result[1].num_features == 8
    assert result(torch.randn(2, 3, 6, 6)).shape == (2, 5, 4, 4)

    named = nn.Sequential(OrderedDict(fc=nn.Linear(4, 6), act=nn.GELU(), out=nn.Linear(6, 2)))
    result = insert_normalization(named, "layer")
    assert list(result._modules) == ["fc", "fc_norm", "act", "out"]
    assert isinstance(result.fc_norm, nn.LayerNorm)


@pytest.mark.parametrize("kind", ["batch", "layer"])
def test_insert_normalization_copy_roundtrip_compile(kind):
    result = _check_copy_roundtrip_compile(_nested_mixed, lambda m: insert_normalization(m, kind), torch.randn(7, 8))
    assert sum(isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) for m in result.modules()) == 2


def test_insert_normalization_inplace():
    model = _nested_mixed()
    assert insert_normalization(model, "layer", inplace=True) is model
    assert isinstance(model[1], nn.LayerNorm)


def test_new_modules_follow_the_models_train_eval_mode():
    model = _nested_mixed().eval()
    for fixed in (insert_normalization(model), residualize(model), swap_activation(model, nn.Tanh, nn.RReLU)):
        assert not any(m.training for m in fixed.modules())


def test_batchnorm_standardises_pre_activations_of_a_deep_sigmoid_mlp():
    model = mlp(12, 64, nn.Sigmoid, d_in=10)
    x = 3.0 + 5.0 * torch.randn(256, 10)  # far from standardised inputs

    def pre_activations(net: nn.Module) -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        hooks = [
            m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().double()))
            for m in net.modules()
            if isinstance(m, nn.Sigmoid)
        ]
        net.train()
        net(x)
        for h in hooks:
            h.remove()
        return seen

    plain = pre_activations(model)
    normed = pre_activations(insert_normalization(model, "batch"))
    assert len(normed) == len(plain) == 12
    for z in normed:
        assert z.mean(0).abs().max() < 1e-5
        # BatchNorm divides by sqrt(var + 1e-5): a feature of small variance comes out slightly under 1.
        assert (z.std(0, correction=0) - 1).abs().max() < 1e-2
    # Without it, deep pre-activations have a per-feature spread far from 1 (what the fix is for).
    assert plain[-1].std(0, correction=0).max() < 0.5


def test_insert_normalization_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown kind 'group'"):
        insert_normalization(_nested_mixed(), "group")
    with pytest.raises(ValueError, match=r"nothing to normalise"):
        insert_normalization(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "batch")
    with pytest.raises(ValueError, match=r"kind='layer' covers nn\.Linear only"):
        insert_normalization(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "layer")


# ------------------------------------------------------------------------------------------------- residualize


def test_residualize_wraps_equal_width_blocks_as_identity_at_init():
    model = mlp(5, 16, nn.Tanh, d_in=8, d_out=4)  # Linear(8,16) + 4 blocks of Linear(16,16) + Linear(16,4)
    x = torch.randn(9, 8)
    result = residualize(model)
    assert [type(m) for m in result] == [nn.Linear, nn.Tanh, Residual, Residual, Residual, Residual, nn.Linear]
    for r in result[2:6]:
        assert r.alpha.item() == 0.0 and r.alpha.requires_grad
        assert [type(m) for m in r.block] == [nn.Linear, nn.Tanh]
    # alpha = 0: every block is the identity, only the width-changing layers act.
    assert torch.equal(result(x), model[-1](torch.tanh(model[0](x))))


def test_residual_computes_x_plus_alpha_times_block():
    model = mlp(4, 16, nn.ReLU, d_in=8, d_out=4)
    x = torch.randn(9, 8)
    result = residualize(model, alpha_init=0.5)
    h = torch.relu(model[0](x))
    for i in range(2, 8, 2):
        h = h + 0.5 * torch.relu(model[i](h))
    torch.testing.assert_close(result(x), model[-1](h), rtol=1e-6, atol=1e-6)


def test_residualize_copy_roundtrip_compile():
    x = torch.randn(7, 8)
    result = _check_copy_roundtrip_compile(lambda: mlp(4, 16, nn.Tanh, d_in=8, d_out=4), residualize, x)
    assert sum(isinstance(m, Residual) for m in result.modules()) == 3


def test_residualize_keeps_inserted_normalization_and_names_and_never_nests():
    named = nn.Sequential(
        OrderedDict(fc0=nn.Linear(8, 16), a0=nn.ReLU(), fc1=nn.Linear(16, 16), a1=nn.ReLU(), out=nn.Linear(16, 4))
    )
    result = residualize(insert_normalization(named, "layer"))
    assert list(result._modules) == ["fc0", "fc0_norm", "a0", "fc1", "out"]
    assert [type(m) for m in result.fc1.block] == [nn.Linear, nn.LayerNorm, nn.ReLU]
    with pytest.raises(ValueError, match=r"1 block\(s\) are already Residual"):
        residualize(result)  # an existing residual block is not wrapped twice


def test_residualize_inplace():
    model = mlp(3, 8, nn.ReLU)
    assert residualize(model, inplace=True) is model
    assert isinstance(model[0], Residual)


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_residualize_restores_gradient_flow_in_a_50_layer_mlp(act):
    # The first Linear projects the 32 inputs to width 64, so it stays outside the residual blocks:
    # its gradient has crossed all 49 blocks. (At alpha = 0 the blocks' own weights get no gradient yet.)
    model = mlp(50, 64, act, d_in=32, d_out=10)
    x, y = torch.randn(128, 32), torch.randint(0, 10, (128,))
    plain_ratio = _first_last_ratio(model, x, y)
    fixed = residualize(model)
    fixed_ratio = _first_last_ratio(fixed, x, y)
    assert not 0.1 <= plain_ratio <= 10, plain_ratio
    assert 0.1 <= fixed_ratio <= 10, fixed_ratio

    # After one step the gains leave 0 and every block's weights receive a gradient.
    opt = torch.optim.SGD(fixed.parameters(), lr=0.1)
    opt.step()
    fixed.zero_grad()
    F.cross_entropy(fixed(x), y).backward()
    grads = [ref_norm([m.weight.grad]) for m in fixed.modules() if isinstance(m, nn.Linear)]
    assert min(grads) > 0


def test_residualize_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"needs nn\.Linear layers, and the model has none"):
        residualize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(ValueError, match=r"equal input and output width.*Linear\(8->16\)"):
        residualize(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
    with pytest.raises(ValueError, match=r"alpha_init must be a finite number"):
        residualize(mlp(2, 4), alpha_init=float("nan"))


# ------------------------------------------------------------------------------------------- input scaling


def _skewed(n: int = 500) -> torch.Tensor:
    scale = torch.tensor([1e-3, 1.0, 50.0, 1e3, 7.0, 0.2])
    shift = torch.tensor([5e-3, -3.0, 1e3, 0.0, 42.0, -0.5])
    return torch.randn(n, 6) * scale + shift


def test_input_standardizer_standardises_the_fitting_data():
    data = _skewed()
    s = InputStandardizer.fit(data)
    z = s(data).double()
    assert z.shape == data.shape
    assert z.mean(0).abs().max() < 1e-4
    assert (z.std(0, correction=0) - 1).abs().max() < 1e-4
    d64 = data.double()
    torch.testing.assert_close(s.mean.double(), d64.mean(0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(s.std.double(), d64.std(0, correction=0), rtol=1e-6, atol=1e-9)


def test_input_standardizer_per_channel_and_constant_features():
    images = torch.randn(20, 3, 4, 4) * torch.tensor([1.0, 10.0, 0.1]).view(3, 1, 1) + 2.0
    s = InputStandardizer.fit(images, dim=(0, 2, 3))
    assert s.mean.shape == (3, 1, 1)
    z = s(images).double()
    assert z.mean((0, 2, 3)).abs().max() < 1e-5
    assert (z.std((0, 2, 3), correction=0) - 1).abs().max() < 1e-4

    data = torch.cat([torch.randn(50, 2), torch.full((50, 1), 4.0)], dim=1)
    s = InputStandardizer.fit(data)
    # A constant feature gets std 1: an unseen value is shifted, not multiplied by 1/eps.
    assert s.std[2] == 1.0
    assert s(torch.tensor([[0.0, 0.0, 5.0]]))[0, 2] == pytest.approx(1.0)


def test_input_standardizer_state_dict_roundtrip():
    s = InputStandardizer.fit(_skewed())
    assert set(s.state_dict()) == {"mean", "std"}
    assert not any(True for _ in s.parameters())  # fitted statistics, not trained
    fresh = InputStandardizer.fit(torch.randn(10, 6))
    x = _skewed(8)
    assert not torch.allclose(fresh(x), s(x))
    fresh.load_state_dict(s.state_dict())
    assert torch.equal(fresh(x), s(x))


def test_prepend_standardizer_copy_roundtrip_compile():
    data = _skewed()
    x = _skewed(16)
    result = _check_copy_roundtrip_compile(
        lambda: mlp(2, 16, nn.Tanh, d_in=6, d_out=3), lambda m: prepend_standardizer(m, data), x
    )
    assert isinstance(result, nn.Sequential) and isinstance(result[0], InputStandardizer)

    model = mlp(2, 16, nn.Tanh, d_in=6, d_out=3)
    wrapped = prepend_standardizer(model, data)
    assert wrapped[1] is not model
    expected = model((x - data.mean(0)) / (data.std(0, correction=0) + 1e-8))
    torch.testing.assert_close(wrapped(x), expected, rtol=1e-5, atol=1e-5)
    assert prepend_standardizer(model, data, inplace=True)[1] is model


def test_input_standardizer_errors_name_the_problem():
    with pytest.raises(TypeError, match=r"data must be a torch\.Tensor.*list"):
        InputStandardizer.fit([[1.0, 2.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"zero-size dimension.*\(0, 3\)"):
        InputStandardizer.fit(torch.empty(0, 3))
    with pytest.raises(ValueError, match=r"zero-size dimension"):
        prepend_standardizer(mlp(1, 4), torch.empty(5, 0))
    with pytest.raises(ValueError, match=r"NaN or inf"):
        InputStandardizer.fit(torch.tensor([[1.0], [float("nan")]]))
    with pytest.raises(ValueError, match=r"dim 2 is out of range"):
        InputStandardizer.fit(torch.randn(4, 3), dim=2)


# ------------------------------------------------------------------------------------------------- penalties


def _regularised_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 8), nn.LayerNorm(8),
        nn.Tanh(), nn.Linear(8, 3),
    )


def _weights_and_rest(model: nn.Sequential) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    weights = [model[0].weight, model[4].weight, model[7].weight]
    rest = [p for p in model.parameters() if all(p is not w for w in weights)]
    return weights, rest


def _ref(tensors: list[torch.Tensor], order: int) -> float:
    flat = torch.cat([t.detach().double().reshape(-1) for t in tensors])
    return float(flat.abs().sum() if order == 1 else flat.square().sum())


@pytest.mark.parametrize("penalty, order", [(l1_penalty, 1), (l2_penalty, 2)])
def test_penalty_matches_float64_reference_and_excludes_biases(penalty, order):
    model = _regularised_model()
    with torch.no_grad():  # normalisation parameters away from 1/0, so leaving them out shows
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    weights, rest = _weights_and_rest(model)
    value = penalty(model, 0.3)
    assert value.dim() == 0 and value.requires_grad
    value = value.detach()
    assert float(value) == pytest.approx(0.3 * _ref(weights, order), rel=1e-6)
    with_bias = penalty(model, 0.3, include_bias=True).detach()
    assert float(with_bias) == pytest.approx(0.3 * _ref(weights + rest, order), rel=1e-6)
    # Bare tensors: 1-d ones are taken to be biases.
    as_params = penalty(list(model.parameters()), 0.3).detach()
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    assert float(as_params) == pytest.approx(0.3 * _ref(matrices, order), rel=1e-6)


@pytest.mark.parametrize("penalty, order", [(l1_penalty, 1), (l2_penalty, 2)])
def test_penalty_gradients_flow_to_weights_only(penalty, order):
    model = _regularised_model()
    weights, rest = _weights_and_rest(model)
    penalty(model, 0.25).backward()
    for w in weights:
        expected = 0.25 * (torch.sign(w) if order == 1 else 2 * w)
        torch.testing.assert_close(w.grad, expected.detach(), rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in rest)


def test_penalty_counts_tied_weights_once_and_skips_frozen():
    shared = nn.Linear(5, 5)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(5, 2))
    model[3].weight.requires_grad_(False)
    assert float(l2_penalty(model, 1.0).detach()) == pytest.approx(_ref([shared.weight], 2), rel=1e-6)


def test_penalty_in_float32_for_half_weights_and_without_host_sync():
    w = nn.Parameter(torch.full((300, 1), 100.0, dtype=torch.float16))  # sum of squares 3e6 > fp16 max
    value = l2_penalty([w], 1.0).detach()
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(3e6, rel=1e-6)
    # On the meta device any read of a value raises: the penalty is built without one.
    meta = nn.Sequential(nn.Linear(4, 4, device="meta"), nn.ReLU(), nn.Linear(4, 2, device="meta"))
    assert l1_penalty(meta, 0.1).device.type == "meta"
    assert l2_penalty(meta, torch.tensor(0.1, device="meta")).device.type == "meta"


def test_penalty_errors_name_the_problem():
    model = mlp(1, 4)
    with pytest.raises(ValueError, match=r"weight must be non-negative"):
        l2_penalty(model, -1e-4)
    with pytest.raises(ValueError, match=r"weight must be a non-negative number"):
        l1_penalty(model, float("nan"))
    with pytest.raises(ValueError, match=r"no parameters to penalise.*include_bias=True"):
        l2_penalty(nn.Sequential(nn.LayerNorm(4)), 0.1)
    with pytest.raises(TypeError, match=r"named_parameters"):
        l2_penalty(model.named_parameters(), 0.1)  # type: ignore[arg-type]

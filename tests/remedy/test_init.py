"""Initialisers: each scheme's variance against its formula, signal propagation through depth, LSUV, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.init import _calculate_fan_in_and_fan_out

from gradguard.remedy.init import SCHEMES, init_, lsuv, zero_init_residual_

REL_TOL = 0.05  # 5%; every weight checked has >= 30k elements, so the standard error of its variance is < 1%

# The gains the Xavier/He papers derive, written from the formulas rather than read from torch.
GAIN = {"linear": 1.0, "relu": math.sqrt(2.0), "tanh": 5.0 / 3.0, "sigmoid": 1.0}


def leaky_gain(slope: float) -> float:
    return math.sqrt(2.0 / (1.0 + slope**2))


def fans(w: torch.Tensor) -> tuple[int, int]:
    return _calculate_fan_in_and_fan_out(w)


def var64(w: torch.Tensor) -> float:
    return float(w.detach().double().var())


def assert_var(w: torch.Tensor, expected: float) -> None:
    got = var64(w)
    assert abs(got - expected) <= REL_TOL * expected, f"variance {got:.5g}, expected {expected:.5g}"
    # a zero-mean scheme: the mean is within a few standard errors of 0
    assert abs(float(w.detach().double().mean())) < 5 * math.sqrt(expected / w.numel())


def assert_distribution(w: torch.Tensor, expected_var: float, distribution: str) -> None:
    """Uniform weights stay inside +-sqrt(3 var); normal ones go well past it."""
    bound = math.sqrt(3.0 * expected_var)
    top = float(w.detach().abs().max())
    if distribution == "uniform":
        assert top <= bound * (1 + 1e-5)
        assert top > 0.99 * bound
    else:
        assert top > 1.5 * bound


def act_module(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "leaky_relu": nn.LeakyReLU(0.2)}[name]


def act_gain(name: str) -> float:
    return leaky_gain(0.2) if name == "leaky_relu" else GAIN[name]


# -- xavier ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid", "leaky_relu"])
def test_xavier_variance_per_layer(distribution, act):
    # non-square layers, so 2 / (fan_in + fan_out) differs from 1 / fan_in and 1 / fan_out
    model = nn.Sequential(nn.Linear(256, 768), act_module(act), nn.Linear(768, 128))
    out = init_(model, "xavier", distribution=distribution)
    assert out is model
    for layer, gain in [(model[0], act_gain(act)), (model[2], GAIN["linear"])]:
        fan_in, fan_out = fans(layer.weight)
        expected = gain**2 * 2.0 / (fan_in + fan_out)
        assert_var(layer.weight, expected)
        assert_distribution(layer.weight, expected, distribution)
        assert torch.all(layer.bias == 0)


def test_xavier_conv_counts_the_kernel_in_both_fans():
    model = nn.Sequential(nn.Conv2d(64, 128, kernel_size=3), nn.Tanh(), nn.Conv1d(64, 96, kernel_size=5))
    init_(model, "xavier")
    for layer, gain in [(model[0], GAIN["tanh"]), (model[2], GAIN["linear"])]:
        k = math.prod(layer.weight.shape[2:])
        fan_in, fan_out = layer.weight.shape[1] * k, layer.weight.shape[0] * k
        assert (fan_in, fan_out) == fans(layer.weight)
        assert_var(layer.weight, gain**2 * 2.0 / (fan_in + fan_out))


# -- kaiming -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize("act", ["relu", "tanh", "leaky_relu"])
def test_kaiming_variance_per_layer(act, mode, distribution):
    model = nn.Sequential(nn.Linear(256, 1024), act_module(act), nn.Linear(1024, 64))
    init_(model, "kaiming", mode=mode, distribution=distribution)
    for layer, gain in [(model[0], act_gain(act)), (model[2], GAIN["linear"])]:
        fan_in, fan_out = fans(layer.weight)
        expected = gain**2 / (fan_in if mode == "fan_in" else fan_out)
        assert_var(layer.weight, expected)
        assert_distribution(layer.weight, expected, distribution)
        assert torch.all(layer.bias == 0)


def test_kaiming_leaky_relu_uses_its_slope():
    model = nn.Sequential(nn.Linear(512, 512), nn.LeakyReLU(0.5), nn.Linear(512, 512), nn.LeakyReLU(0.01))
    init_(model, "kaiming")
    assert_var(model[0].weight, leaky_gain(0.5) ** 2 / 512)
    assert_var(model[2].weight, leaky_gain(0.01) ** 2 / 512)


def test_kaiming_conv3d_fan_includes_kernel():
    conv = nn.Conv3d(16, 32, kernel_size=(3, 4, 5))
    init_(nn.Sequential(conv, nn.ReLU()), "kaiming", mode="fan_out")
    assert_var(conv.weight, 2.0 / (32 * 3 * 4 * 5))


def test_grouped_conv_fan_in_is_per_group():
    conv = nn.Conv2d(128, 256, kernel_size=3, groups=4)
    init_(nn.Sequential(conv, nn.ReLU()), "kaiming")
    assert_var(conv.weight, 2.0 / (128 // 4 * 9))


def test_following_activation_found_by_registration_order_across_nesting():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(512, 512)
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            return self.drop(self.fc(x))

    # fc inside a block, its activation outside it and after a non-activation module;
    # "lin" is followed by another weight layer before any activation, so it counts as linear.
    model = nn.Sequential(Block(), nn.Tanh(), nn.Linear(512, 512), nn.Linear(512, 512), nn.ReLU())
    init_(model, "kaiming")
    assert_var(model[0].fc.weight, GAIN["tanh"] ** 2 / 512)
    assert_var(model[2].weight, GAIN["linear"] ** 2 / 512)
    assert_var(model[3].weight, GAIN["relu"] ** 2 / 512)


def test_activation_argument_overrides_the_found_one():
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    init_(model, "kaiming", activation="tanh")
    assert_var(model[0].weight, GAIN["tanh"] ** 2 / 512)
    assert_var(model[2].weight, GAIN["tanh"] ** 2 / 512)
    init_(model, "kaiming", activation=nn.LeakyReLU(0.3))
    assert_var(model[0].weight, leaky_gain(0.3) ** 2 / 512)
    assert_var(model[2].weight, leaky_gain(0.3) ** 2 / 512)


# -- lecun -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_lecun_variance_is_one_over_fan_in_whatever_follows(distribution):
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.Tanh())
    init_(model, "lecun", distribution=distribution, mode="fan_out")  # mode is kaiming's only
    for layer in (model[0], model[2]):
        fan_in, _ = fans(layer.weight)
        assert_var(layer.weight, 1.0 / fan_in)
        assert_distribution(layer.weight, 1.0 / fan_in, distribution)


# -- orthogonal --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid", "leaky_relu"])
def test_orthogonal_square_is_gain_times_orthogonal(act):
    model = nn.Sequential(nn.Linear(256, 256), act_module(act))
    init_(model, "orthogonal")
    w = model[0].weight.detach().double()
    gain = act_gain(act)
    eye = torch.eye(256, dtype=torch.float64)
    torch.testing.assert_close(w @ w.T, gain**2 * eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(w.T @ w, gain**2 * eye, atol=1e-5, rtol=0)
    assert torch.all(model[0].bias == 0)


def test_orthogonal_rectangular_and_conv_have_orthonormal_rows_or_columns():
    model = nn.Sequential(nn.Linear(300, 100), nn.Tanh(), nn.Linear(100, 300), nn.Conv2d(8, 16, 3), nn.ReLU())
    init_(model, "orthogonal")
    wide = model[0].weight.detach().double()  # 100 x 300: rows orthonormal
    tall = model[2].weight.detach().double()  # 300 x 100: columns orthonormal
    conv = model[3].weight.detach().double().reshape(16, -1)  # 16 x 72
    eye = torch.eye(100, dtype=torch.float64)
    torch.testing.assert_close(wide @ wide.T, GAIN["tanh"] ** 2 * eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(tall.T @ tall, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(conv @ conv.T, GAIN["relu"] ** 2 * eye[:16, :16], atol=1e-5, rtol=0)


def test_orthogonal_works_in_bfloat16():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU()).to(torch.bfloat16)
    init_(model, "orthogonal")
    w = model[0].weight.double()
    assert model[0].weight.dtype == torch.bfloat16
    torch.testing.assert_close(w @ w.T, 2.0 * torch.eye(64, dtype=torch.float64), atol=0.05, rtol=0)


# -- auto ---------------------------------------------------------------------------------------------------------


def test_auto_picks_kaiming_after_relu_family_and_xavier_otherwise():
    # shapes are non-square so that kaiming (gain^2 / fan_in) and xavier (gain^2 * 2 / (fan_in + fan_out)) differ
    model = nn.Sequential(
        nn.Linear(256, 1024), nn.ReLU(),
        nn.Linear(1024, 256), nn.Tanh(),
        nn.Linear(256, 512), nn.Sigmoid(),
        nn.Linear(512, 128), nn.LeakyReLU(0.2),
        nn.Linear(128, 512), nn.GELU(),
        nn.Linear(512, 64),
    )  # fmt: skip
    init_(model, "auto")

    def kaiming(w, gain):
        return gain**2 / fans(w)[0]

    def xavier(w, gain):
        fan_in, fan_out = fans(w)
        return gain**2 * 2.0 / (fan_in + fan_out)

    expected = [
        (model[0], kaiming, GAIN["relu"]),
        (model[2], xavier, GAIN["tanh"]),
        (model[4], xavier, GAIN["sigmoid"]),
        (model[6], kaiming, leaky_gain(0.2)),
        (model[8], kaiming, GAIN["relu"]),  # GELU is ReLU-family
        (model[10], xavier, GAIN["linear"]),
    ]
    for layer, formula, gain in expected:
        other = xavier if formula is kaiming else kaiming
        # the two formulas must be told apart by more than the tolerance for the check to mean anything
        assert abs(other(layer.weight, gain) / formula(layer.weight, gain) - 1) > 3 * REL_TOL
        assert_var(layer.weight, formula(layer.weight, gain))


def test_auto_uses_lecun_before_selu():
    model = nn.Sequential(nn.Linear(256, 1024), nn.SELU())
    init_(model, "auto")
    assert_var(model[0].weight, 1.0 / 256)


# -- selecting layers --------------------------------------------------------------------------------------------


def test_layers_list_initialises_only_those():
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU())
    before = model[2].weight.detach().clone(), model[2].bias.detach().clone()
    init_(model, "kaiming", layers=["0"])
    assert_var(model[0].weight, 2.0 / 512)
    assert torch.equal(model[2].weight, before[0])
    assert torch.equal(model[2].bias, before[1])


def test_layers_dict_chooses_scheme_per_layer():
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 64))
    before = model[4].weight.detach().clone()
    init_(model, "kaiming", layers={"0": "lecun", "2": "xavier"})
    assert_var(model[0].weight, 1.0 / 256)
    assert_var(model[2].weight, GAIN["relu"] ** 2 * 2.0 / (1024 + 256))
    assert torch.equal(model[4].weight, before)


# -- signal propagation through depth ----------------------------------------------------------------------------


def relu_mlp(depth: int = 30, width: int = 256) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def hidden_std_ratio(model: nn.Sequential, x: torch.Tensor) -> float:
    """Std of the last hidden activation over that of the first, measured with forward hooks."""
    stds: list[float] = []
    relus = [m for m in model if isinstance(m, nn.ReLU)]
    handles = [m.register_forward_hook(lambda m, i, o: stds.append(float(o.double().std()))) for m in relus]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    assert len(stds) == len(relus)
    return stds[-1] / stds[0]


def test_kaiming_keeps_activation_scale_through_30_relu_layers():
    x = torch.randn(512, 256)
    default = relu_mlp()
    ratio_default = hidden_std_ratio(default, x)
    # PyTorch's default init (variance 1/(3 fan_in)) shrinks the signal through depth: the contrast.
    assert not 0.3 <= ratio_default <= 3.0, ratio_default

    model = relu_mlp()
    init_(model, "kaiming")
    ratio = hidden_std_ratio(model, x)
    assert 0.3 <= ratio <= 3.0, ratio


# -- LSUV ---------------------------------------------------------------------------------------------------------


class ReverseRegistered(nn.Module):
    """Registers its layers in the reverse of the order it calls them, with dropout and a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(128, 10)
        self.fc = nn.Linear(16 * 8 * 8, 128)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        x = self.drop(torch.relu(self.fc(x.flatten(1))))
        return self.head(x)


def layer_output_variances(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = {}

    def record(name: str, output: torch.Tensor) -> None:  # returns None: a hook's return value replaces the output
        out.setdefault(name, var64(output))

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            handles.append(m.register_forward_hook(lambda m, i, o, name=name: record(name, o)))
    was = model.training
    model.eval()
    with torch.no_grad():
        model(x)
    model.train(was)
    for h in handles:
        h.remove()
    return out


def hook_count(model: nn.Module) -> int:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, kind)) for m in model.modules() for kind in kinds)


def test_lsuv_gives_every_layer_unit_output_variance():
    model = ReverseRegistered()
    x = 3.0 * torch.randn(256, 3, 8, 8) + 1.0  # unnormalised input: the first layer has real work to do
    before = layer_output_variances(model, x)
    assert any(abs(v - 1) > 0.1 for v in before.values())  # the test starts from somewhere wrong

    out = lsuv(model, x)
    assert out is model
    after = layer_output_variances(model, x)
    assert set(after) == {"conv1", "conv2", "fc", "head"}
    for name, v in after.items():
        assert abs(v - 1.0) < 0.1, (name, v)
    assert hook_count(model) == 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            assert torch.all(m.bias == 0), name


def test_lsuv_keeps_user_hooks_and_restores_training_flags():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 64))
    calls: list[int] = []
    model[0].register_forward_hook(lambda m, i, o: calls.append(1))
    model.train()
    model[2].eval()  # a mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    lsuv(model, torch.randn(128, 64))
    assert [m.training for m in model.modules()] == flags
    assert hook_count(model) == 1  # only the user's own
    n = len(calls)
    model(torch.randn(4, 64))
    assert len(calls) == n + 1


def test_lsuv_tolerance_is_respected():
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 8))
    x = torch.randn(512, 64) * 10
    lsuv(model, x, tol=0.01)
    for name, v in layer_output_variances(model, x).items():
        assert abs(v - 1.0) < 0.01, (name, v)


# -- residual branches -------------------------------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self, width: int, skipinit: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.skipinit_gain = nn.Parameter(torch.ones(())) if skipinit else None

    def forward(self, x):
        branch = self.fc2(torch.relu(self.fc1(x)))
        if self.skipinit_gain is not None:
            branch = self.skipinit_gain * branch
        return x + branch


def test_zero_init_residual_by_name_makes_each_block_the_identity():
    model = nn.Sequential(Residual(32, skipinit=False), Residual(32, skipinit=False))
    x = torch.randn(16, 32)
    assert not torch.allclose(model(x), x)
    zero_init_residual_(model, names=["0.fc2", "1.fc2"])
    for name in ("0.fc2", "1.fc2"):
        layer = model.get_submodule(name)
        assert torch.all(layer.weight == 0) and torch.all(layer.bias == 0)
    assert torch.all(model[0].fc1.weight != 0)  # only the named layers
    torch.testing.assert_close(model(x), x)


def test_zero_init_residual_finds_skipinit_gains():
    model = nn.Sequential(Residual(32, skipinit=True), Residual(32, skipinit=True))
    x = torch.randn(16, 32)
    zero_init_residual_(model)
    assert all(float(b.skipinit_gain.detach()) == 0 for b in model)
    torch.testing.assert_close(model(x), x)
    assert torch.all(model[0].fc2.weight != 0)  # the branch itself keeps its weights, so it still learns


# -- errors at the boundary --------------------------------------------------------------------------------------


def test_unknown_scheme_lists_the_schemes():
    with pytest.raises(ValueError, match="glorot") as err:
        init_(nn.Linear(4, 4), "glorot")
    for s in SCHEMES:
        assert repr(s) in str(err.value)


def test_model_without_weight_layers_says_so():
    with pytest.raises(ValueError, match="no Linear or Conv"):
        init_(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4)), "kaiming")
    with pytest.raises(ValueError, match="no Linear or Conv"):
        lsuv(nn.Sequential(nn.ReLU()), torch.randn(2, 4))


def test_non_module_is_a_type_error():
    model = nn.Linear(4, 4)
    with pytest.raises(TypeError, match=r"nn\.Module.*generator"):
        init_(model.parameters(), "kaiming")  # type: ignore
    with pytest.raises(TypeError, match="nn.Module"):
        lsuv(model.state_dict(), torch.randn(2, 4))  # type: ignore
    with pytest.raises(TypeError, match="nn.Module"):
        zero_init_residual_([model])  # type: ignore


def test_lsuv_batch_must_be_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor, got list"):
        lsuv(nn.Linear(4, 4), [[1.0, 2.0, 3.0, 4.0]])  # type: ignore


def test_other_bad_arguments_name_the_problem():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="mode 'fan_avg'"):
        init_(model, "kaiming", mode="fan_avg")
    with pytest.raises(ValueError, match="distribution 'gaussian'"):
        init_(model, "kaiming", distribution="gaussian")
    with pytest.raises(ValueError, match="activation 'swoosh'"):
        init_(model, "kaiming", activation="swoosh")
    with pytest.raises(ValueError, match="'head'.*'0'"):
        init_(model, "kaiming", layers=["head"])
    with pytest.raises(ValueError, match="'lecunn' for layer '0'"):
        init_(model, "kaiming", layers={"0": "lecunn"})
    with pytest.raises(ValueError, match="lazy"):
        init_(nn.Sequential(nn.LazyLinear(4)), "kaiming")
    with pytest.raises(ValueError, match="'nope'"):
        zero_init_residual_(model, names=["nope"])
    with pytest.raises(ValueError, match="no weight or bias"):
        zero_init_residual_(model, names=["1"])
    with pytest.raises(ValueError, match="skipinit_gain"):
        zero_init_residual_(model)
    with pytest.raises(ValueError, match="variance 0"):
        lsuv(model, torch.zeros(8, 4))


def test_zero_init_residual_zeroes_the_alpha_of_residualize_blocks():
    from gradguard.remedy import residualize

    model = residualize(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()), alpha_init=0.5)
    alphas = [m.alpha for m in model.modules() if hasattr(m, "alpha")]
    assert alphas and all(float(a.detach()) == 0.5 for a in alphas)
    zero_init_residual_(model)
    assert all(float(a.detach()) == 0.0 for a in alphas)
    x = torch.randn(3, 8)
    assert torch.equal(model(x), x)  # every block is the identity again

"""TARGET and the diagnose flags: loading, data, losses, and one clear line for every mistake."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradguard.diagnosis.target import (
    DATASETS,
    LOSSES,
    TargetError,
    load_callable,
    make_batch,
    make_loss,
    resolve,
)

MODELS = """
import torch
from torch import nn


def mlp(d_in, d_out):
    return nn.Sequential(nn.Linear(d_in, 16), nn.Tanh(), nn.Linear(16, d_out))


def digits():
    return mlp(64, 10)


def diabetes():
    return mlp(10, 1)


def cancer():
    return mlp(30, 2)


def cancer_one_logit():
    return mlp(30, 1)


def two_classes():
    return mlp(64, 2)


def wide():
    return mlp(784, 10)


def conv():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())


def with_batchnorm():
    return nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def pair_output():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(64, 10)

        def forward(self, x):
            return self.layer(x), x

    return Pair()


def tuple3():
    model = mlp(8, 3)
    batch = (torch.randn(16, 8), torch.randint(0, 3, (16,)))
    return model, batch, nn.CrossEntropyLoss()


def tuple4():
    model = mlp(8, 3)
    batch = (torch.randn(16, 8), torch.randint(0, 3, (16,)))
    return model, batch, nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters(), lr=1e-3)


def foreign_optimizer():
    model = mlp(8, 3)
    batch = (torch.randn(16, 8), torch.randint(0, 3, (16,)))
    return model, batch, nn.CrossEntropyLoss(), torch.optim.SGD(mlp(8, 3).parameters(), lr=0.1)


def not_an_optimizer():
    model = mlp(8, 3)
    return model, (torch.randn(16, 8), torch.randint(0, 3, (16,))), nn.CrossEntropyLoss(), "adam"


def two_items():
    return mlp(8, 3), nn.MSELoss()


def first_not_model():
    return "model", (torch.randn(4, 8), torch.randn(4, 3)), nn.MSELoss()


def no_parameters():
    return nn.ReLU(), (torch.randn(4, 8), torch.randn(4, 8)), nn.MSELoss()


def batch_dict():
    return mlp(8, 3), {"x": torch.randn(4, 8)}, nn.MSELoss()


def inputs_tuple():
    return mlp(8, 3), ((torch.randn(4, 8), torch.randn(4, 8)), torch.randn(4, 3)), nn.MSELoss()


def loss_not_callable():
    return mlp(8, 3), (torch.randn(4, 8), torch.randn(4, 3)), "mse"


def loss_raises():
    def squared_error(output, targets):
        return (output - targets).pow(2).mean()

    return mlp(8, 3), (torch.randn(4, 8), torch.randn(4, 5)), squared_error


def loss_not_scalar():
    return mlp(8, 3), (torch.randn(4, 8), torch.randn(4, 3)), nn.MSELoss(reduction="none")


def batch_wrong_width():
    return mlp(8, 3), (torch.randn(4, 5), torch.randn(4, 3)), nn.MSELoss()


def returns_number():
    return 42


def broken():
    x = 1
    raise ValueError("the depth must be positive")


def needs_depth(depth):
    return mlp(depth, 10)


class Factory:
    @staticmethod
    def build():
        return mlp(64, 10)


ready_model = mlp(64, 10)
not_callable = 3
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def models(tmp_path: Path) -> str:
    """``TARGET`` prefix (absolute path and ':') of a file holding every model used below."""
    return f"{write(tmp_path, 'models.py', MODELS)}:"


def error(excinfo: pytest.ExceptionInfo[TargetError]) -> str:
    """The error's text, checked to be one line."""
    message = str(excinfo.value)
    assert "\n" not in message and message.strip() == message and message
    return message


# --------------------------------------------------------------------------------------------------------
# load_callable


def test_loads_a_relative_file_and_restores_sys_path(tmp_path, monkeypatch):
    write(tmp_path, "siblinghelper.py", "from torch import nn\n\ndef net():\n    return nn.Linear(64, 10)\n")
    write(tmp_path, "withsibling.py", "from siblinghelper import net\n\ndef make():\n    return net()\n")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    fn = load_callable("withsibling.py:make")
    assert sys.path == before
    assert isinstance(fn(), nn.Linear)


def test_a_sibling_imported_inside_the_callable_is_found(tmp_path, monkeypatch):
    write(tmp_path, "lazyhelper.py", "from torch import nn\n\ndef net():\n    return nn.Linear(64, 10)\n")
    write(tmp_path, "lazy.py", "def make():\n    from lazyhelper import net\n    return net()\n")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    assert isinstance(resolve("lazy.py:make", batch_size=4).model, nn.Linear)
    assert sys.path == before


def test_same_file_name_in_two_directories_gives_two_modules(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write(tmp_path / "a", "model.py", "def make():\n    return 'a'\n")
    write(tmp_path / "b", "model.py", "def make():\n    return 'b'\n")
    assert load_callable(f"{tmp_path / 'a' / 'model.py'}:make")() == "a"
    assert load_callable(f"{tmp_path / 'b' / 'model.py'}:make")() == "b"


def test_loads_package_module_callable(tmp_path, monkeypatch):
    package = tmp_path / "ggtargetpkg"
    package.mkdir()
    write(package, "__init__.py", "")
    write(package, "nets.py", "from torch import nn\n\ndef make():\n    return nn.Linear(64, 10)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(load_callable("ggtargetpkg.nets:make")(), nn.Linear)
    setup = resolve("ggtargetpkg.nets:make", batch_size=8)
    assert setup.batch[0].shape == (8, 64)


def test_dotted_attribute_reaches_into_a_class(models):
    assert isinstance(load_callable(models + "Factory.build")(), nn.Sequential)


def test_target_without_colon():
    with pytest.raises(TargetError) as excinfo:
        load_callable("models.py")
    assert "path/to/file.py:callable" in error(excinfo) and "'models.py'" in error(excinfo)


def test_missing_file_names_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TargetError) as excinfo:
        load_callable("nowhere/model.py:make")
    assert str(tmp_path / "nowhere" / "model.py") in error(excinfo)


def test_path_without_py_suffix():
    with pytest.raises(TargetError) as excinfo:
        load_callable("models/net:make")
    assert "'models/net' is not a .py file" in error(excinfo)


def test_module_that_cannot_be_imported():
    with pytest.raises(TargetError) as excinfo:
        load_callable("gg_no_such_package.nets:make")
    assert "No module named 'gg_no_such_package'" in error(excinfo)


def test_module_whose_import_raises_names_its_line(tmp_path, monkeypatch):
    write(tmp_path, "ggtargetbroken.py", "import torch\n\nraise RuntimeError('cuda only')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TargetError) as excinfo:
        load_callable("ggtargetbroken:make")
    message = error(excinfo)
    assert "RuntimeError: cuda only" in message and "ggtargetbroken.py:3" in message


def test_file_that_raises_names_type_message_and_line(tmp_path):
    path = write(tmp_path, "raising.py", "import torch\n\nx = 1\ny = {}['missing']\n")
    with pytest.raises(TargetError) as excinfo:
        load_callable(f"{path}:make")
    message = error(excinfo)
    assert "KeyError: 'missing'" in message and f"{path}:4" in message
    assert "Traceback" not in message


def test_file_that_raises_in_a_sibling_points_at_the_import(tmp_path, monkeypatch):
    write(tmp_path, "badsibling.py", "raise ImportError('needs a GPU\\nsecond line')\n")
    write(tmp_path, "usessibling.py", "import torch\nimport badsibling\n")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    with pytest.raises(TargetError) as excinfo:
        load_callable("usessibling.py:make")
    message = error(excinfo)
    assert "ImportError: needs a GPU" in message and "usessibling.py:2" in message and "second line" not in message
    assert sys.path == before


def test_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "typo.py", "def make():\n    return nn.Linear(64 10)\n")
    with pytest.raises(TargetError) as excinfo:
        load_callable(f"{path}:make")
    message = error(excinfo)
    assert "SyntaxError" in message and f"{path}:2" in message


def test_missing_attribute_lists_the_callables_there(models):
    with pytest.raises(TargetError) as excinfo:
        load_callable(models + "digit")
    message = error(excinfo)
    assert "no attribute 'digit'" in message and "digits" in message and "mlp" in message
    assert "ready_model" not in message  # an instance of a torch class: not defined in models.py


def test_attribute_not_callable(models):
    with pytest.raises(TargetError) as excinfo:
        load_callable(models + "not_callable")
    assert "not_callable is a int, not callable" in error(excinfo)


def test_model_instance_asks_for_a_function(models):
    with pytest.raises(TargetError) as excinfo:
        load_callable(models + "ready_model")
    assert "ready_model is a model (Sequential)" in error(excinfo)


def test_callable_that_needs_arguments(models):
    with pytest.raises(TargetError) as excinfo:
        load_callable(models + "needs_depth")
    assert "needs arguments (depth)" in error(excinfo)


# --------------------------------------------------------------------------------------------------------
# resolve: a model, data from the flags


def test_digits_default(models):
    setup = resolve(models + "digits")
    x, y = setup.batch
    assert x.shape == (128, 64) and x.dtype == torch.float32
    assert y.shape == (128,) and y.dtype == torch.long and int(y.min()) >= 0 and int(y.max()) <= 9
    assert float(x.max()) == 16.0  # raw pixel counts, not standardised
    assert isinstance(setup.loss_fn, nn.CrossEntropyLoss)
    assert setup.optimizer is None and setup.optimizer_name == "sgd" and setup.lr is None
    assert setup.description == "digits: 128 samples x 64 features, 10 classes; loss ce"


def test_diabetes_regression(models):
    setup = resolve(models + "diabetes", data="diabetes", batch_size=32, optimizer="adam", lr=0.01)
    x, y = setup.batch
    assert x.shape == (32, 10) and y.shape == (32, 1) and y.dtype == torch.float32
    assert setup.optimizer_name == "adam" and setup.lr == 0.01
    assert "regression; loss mse" in setup.description
    assert setup.loss_fn(setup.model(x), y).ndim == 0


def test_diabetes_uses_every_row_when_the_batch_asks_for_more(models):
    setup = resolve(models + "diabetes", data="diabetes", batch_size=1000)
    assert setup.batch[0].shape == (442, 10)


def test_breast_cancer_ce_and_bce(models):
    ce = resolve(models + "cancer", data="breast_cancer")
    assert ce.batch[0].shape == (128, 30) and ce.batch[1].dtype == torch.long
    assert set(ce.batch[1].tolist()) == {0, 1} and "2 classes; loss ce" in ce.description
    bce = resolve(models + "cancer_one_logit", data="breast_cancer", loss="bce")
    assert bce.batch[1].shape == (128, 1) and bce.batch[1].dtype == torch.float32
    assert isinstance(bce.loss_fn, nn.BCEWithLogitsLoss)


def test_random_data_is_shaped_from_the_model(models):
    ce = resolve(models + "digits", data="random", loss="ce", batch_size=20)
    x, y = ce.batch
    assert x.shape == (20, 64) and y.shape == (20,) and y.dtype == torch.long and int(y.max()) < 10
    mse = resolve(models + "diabetes", data="random", batch_size=20)
    assert mse.batch[0].shape == (20, 10) and mse.batch[1].shape == (20, 1) and "loss mse" in mse.description
    bce = resolve(models + "cancer_one_logit", data="random", loss="bce", batch_size=20)
    assert set(bce.batch[1].flatten().tolist()) <= {0.0, 1.0}


def test_same_seed_same_batch_and_model(models):
    a = resolve(models + "digits", batch_size=16, seed=3)
    b = resolve(models + "digits", batch_size=16, seed=3)
    c = resolve(models + "digits", batch_size=16, seed=4)
    assert torch.equal(a.batch[0], b.batch[0]) and torch.equal(a.batch[1], b.batch[1])
    assert not torch.equal(a.batch[0], c.batch[0])
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    r1 = resolve(models + "digits", data="random", batch_size=16, seed=3)
    r2 = resolve(models + "digits", data="random", batch_size=16, seed=3)
    assert torch.equal(r1.batch[0], r2.batch[0])


def test_checking_the_model_leaves_batchnorm_statistics_alone(models):
    setup = resolve(models + "with_batchnorm")
    norm = setup.model[1]
    assert torch.equal(norm.running_mean, torch.zeros(16)) and int(norm.num_batches_tracked) == 0


def test_npz_with_x_y_and_with_inputs_targets(tmp_path, models):
    rng = np.random.default_rng(0)
    classes = tmp_path / "classes.npz"
    np.savez(classes, x=rng.normal(size=(50, 64)), y=rng.integers(0, 10, 50))
    setup = resolve(models + "digits", data=str(classes), batch_size=32)
    assert setup.batch[0].shape == (32, 64) and setup.batch[0].dtype == torch.float32
    assert setup.batch[1].dtype == torch.long and "loss ce" in setup.description

    values = tmp_path / "values.npz"
    np.savez(values, inputs=rng.normal(size=(40, 10)), targets=rng.normal(size=40))
    setup = resolve(models + "diabetes", data=str(values))
    assert setup.batch[0].shape == (40, 10) and setup.batch[1].shape == (40, 1) and "loss mse" in setup.description


def test_make_batch_and_make_loss_directly():
    model = nn.Sequential(nn.Linear(64, 10))
    (x, y), loss, description = make_batch("digits", model, None, 8, 0)
    assert x.shape == (8, 64) and loss == "ce" and description.startswith("digits: 8 samples")
    assert {name: type(make_loss(name)).__name__ for name in ("ce", "bce")} == {
        "ce": "CrossEntropyLoss",
        "bce": "BCEWithLogitsLoss",
    }
    with pytest.raises(ValueError, match="one shape"):
        make_loss("mse")(torch.zeros(4, 1), torch.zeros(4))  # no silent broadcasting to [4, 4]
    assert DATASETS == ("digits", "diabetes", "breast_cancer", "random") and LOSSES == ("ce", "mse", "bce")


# --------------------------------------------------------------------------------------------------------
# resolve: a tuple


def test_tuple_without_optimizer(models):
    setup = resolve(models + "tuple3", optimizer="adam")
    assert setup.batch[0].shape == (16, 8) and setup.optimizer is None and setup.optimizer_name == "adam"
    assert setup.description.startswith("batch from ") and "inputs [16, 8] float32" in setup.description


def test_tuple_with_optimizer(models):
    setup = resolve(models + "tuple4")
    assert isinstance(setup.optimizer, torch.optim.Adam) and setup.optimizer_name == "given" and setup.lr is None
    assert "optimizer Adam (given)" in setup.description


@pytest.mark.parametrize(
    ("name", "flags", "expected"),
    [
        ("tuple3", {"data": "digits"}, "--data would be ignored"),
        ("tuple3", {"loss": "mse", "data": "random"}, "--data and --loss would be ignored"),
        ("tuple4", {"optimizer": "sgd"}, "--optimizer would be ignored"),
        ("tuple4", {"lr": 0.1}, "--lr would be ignored"),
        ("foreign_optimizer", {}, "holds 4 of 4 parameters that are not the returned model's"),
        ("not_an_optimizer", {}, "fourth item"),
        ("two_items", {}, "returned a tuple of 2 items"),
        ("returns_number", {}, "returned a int; expected an nn.Module"),
        ("first_not_model", {}, "first item"),
        ("no_parameters", {}, "has no parameters"),
        ("batch_dict", {}, "must be (inputs, targets), got a dict"),
        ("inputs_tuple", {}, "inputs from"),
        ("loss_not_callable", {}, "is a str, not callable"),
        ("loss_raises", {}, "failed on output [4, 3], targets [4, 5]: RuntimeError: The size of tensor a"),
        ("loss_not_scalar", {}, "shape [4, 3], not a scalar"),
        ("batch_wrong_width", {}, "has inputs of shape [4, 5]"),
    ],
)
def test_tuple_mistakes(models, name, flags, expected):
    with pytest.raises(TargetError) as excinfo:
        resolve(models + name, **flags)
    assert expected in error(excinfo)


# --------------------------------------------------------------------------------------------------------
# resolve: mistakes in the flags, the call, the data and the loss


def test_callable_that_raises_names_type_message_and_line(models):
    with pytest.raises(TargetError) as excinfo:
        resolve(models + "broken")
    message = error(excinfo)
    assert message.startswith(f"calling {models}broken raised ValueError: the depth must be positive")
    line = MODELS.splitlines().index('    raise ValueError("the depth must be positive")') + 1
    assert message.endswith(f"({models[:-1]}:{line})")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"batch_size": 0}, "--batch must be a positive whole number, got 0"),
        ({"lr": 0.0}, "--lr must be a positive number, got 0.0"),
        ({"lr": -1.0}, "--lr must be a positive number"),
        ({"data": "mnist"}, "unknown --data 'mnist': choose digits, diabetes, breast_cancer, random"),
        ({"loss": "nll"}, "unknown --loss 'nll': choose ce, mse, bce"),
        ({"optimizer": "lbfgs"}, "unknown --optimizer 'lbfgs'"),
        ({"data": "missing.npz"}, "missing.npz"),
    ],
)
def test_flag_mistakes(models, flags, expected):
    with pytest.raises(TargetError) as excinfo:
        resolve(models + "digits", **flags)
    assert expected in error(excinfo)


@pytest.mark.parametrize(
    ("name", "flags", "expected"),
    [
        ("wide", {}, "could not run on the batch: RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
        ("wide", {}, "(--data digits gives inputs of shape [128, 64] float32)"),
        ("diabetes", {"data": "digits"}, "[128, 64]"),
        ("conv", {"data": "random"}, "has no nn.Linear: return (model, (inputs, targets), loss_fn)"),
        ("diabetes", {"data": "diabetes", "loss": "ce"}, "real-valued targets (output [128, 1], targets [128])"),
        ("diabetes", {"data": "random", "loss": "ce"}, "[128, 1]: use --loss mse"),
        ("cancer_one_logit", {"data": "breast_cancer"}, "(output [128, 1], targets [128]): use --loss mse"),
        ("two_classes", {}, "class labels 0..9 but the model's output has 2 class column(s)"),
        ("digits", {"loss": "mse"}, "--loss mse needs the output shaped like the targets (output [128, 10]"),
        ("digits", {"loss": "bce"}, "--loss bce needs targets in [0, 1]"),
        ("cancer", {"data": "breast_cancer", "loss": "bce"}, "(output [128, 2], targets [128])"),
        ("pair_output", {}, "the model returns a tuple, not a tensor"),
    ],
)
def test_data_and_loss_mismatches(models, name, flags, expected):
    with pytest.raises(TargetError) as excinfo:
        resolve(models + name, **flags)
    assert expected in error(excinfo)


def test_bad_npz_files(tmp_path, models):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    keys = tmp_path / "keys.npz"
    np.savez(keys, features=np.zeros((4, 64)), labels=np.zeros(4))
    rows = tmp_path / "rows.npz"
    np.savez(rows, x=np.zeros((4, 64)), y=np.zeros(5, dtype=np.int64))
    cases = [
        (garbage, "cannot read --data"),
        (keys, "needs arrays x and y (or inputs and targets); it has: features, labels"),
        (rows, "x [4, 64] and y [5] must have the same number of rows"),
    ]
    for path, expected in cases:
        with pytest.raises(TargetError) as excinfo:
            resolve(models + "digits", data=str(path))
        assert expected in error(excinfo)

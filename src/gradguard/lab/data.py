"""Data for the lab's cases: scikit-learn's bundled sets and synthetic tasks, generated from a seed (no downloads)."""

from __future__ import annotations

import torch


def _sklearn(name: str):  # noqa: ANN202
    try:
        import sklearn.datasets as ds
    except ImportError:
        raise ImportError("the lab uses scikit-learn's bundled data sets: pip install 'gradguard[lab]'") from None
    return getattr(ds, f"load_{name}")()


def digits(seed: int = 0, standardize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """8x8 digits, 10 classes, split 80/20 by a seeded permutation: x_train, y_train, x_test, y_test.

    Standardised with the training split's mean and spread unless ``standardize=False``.
    """
    data = _sklearn("digits")
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    return _split(x, y, seed, standardize)


def diabetes(seed: int = 0, standardize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Diabetes regression (10 features, 442 samples), target standardised, split 80/20: x_train, y_train, ...

    ``standardize=False`` gives the inputs with the raw scale of the original study (age in years, BMI,
    blood pressure, ...) reconstructed from scikit-learn's scaled copy: each column rescaled to unit
    spread times a per-feature scale spanning 1 to 100, the situation the seed documents' input
    normalisation case is about.
    """
    data = _sklearn("diabetes")
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.float32).reshape(-1, 1)
    y = (y - y.mean()) / y.std()
    if not standardize:
        x = (x - x.mean(0)) / x.std(0) * torch.logspace(0, 2, x.shape[1]) + 50.0
    return _split(x, y, seed, standardize)


def _split(x: torch.Tensor, y: torch.Tensor, seed: int, standardize: bool):  # noqa: ANN202
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(x))
    if standardize:
        mean, std = x[:cut].mean(0), x[:cut].std(0).clamp_min(1e-6)
        x = (x - mean) / std
    return x[:cut], y[:cut], x[cut:], y[cut:]


def adding_problem(n: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The adding problem (Hochreiter & Schmidhuber 1997): inputs [n, length, 2] (value, marker), target [n, 1].

    Two of the ``length`` positions are marked; the target is the sum of their values. Predicting
    the mean (1.0) gives an MSE of 1/6, the baseline a model must beat.
    """
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, length, generator=g)
    marks = torch.zeros(n, length)
    first = torch.randint(0, length // 2, (n,), generator=g)
    second = torch.randint(length // 2, length, (n,), generator=g)
    rows = torch.arange(n)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    return torch.stack([values, marks], dim=2), (values * marks).sum(1, keepdim=True)

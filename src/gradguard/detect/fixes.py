"""The remedies each finding kind proposes, with code a user can paste.

Each fix has a stable ``name``: :meth:`gradguard.Diagnosis.try_fixes` applies the fix of
that name to a copy of the model and measures it.
"""

from __future__ import annotations

from .finding import Fix

RELU_HE = Fix(
    "Use a ReLU-family activation with He (Kaiming) initialisation",
    "model = gradguard.swap_activation(model, nn.Sigmoid, nn.ReLU)  # or nn.Tanh\n"
    'gradguard.init_(model, "kaiming")',
    name="relu_he",
)
HE_INIT = Fix(
    "Initialise with He (Kaiming) scaling: variance 2/fan_in before a ReLU",
    'gradguard.init_(model, "auto")  # He before ReLU-family layers, Xavier before tanh/sigmoid',
    name="he_init",
)
BATCHNORM = Fix(
    "Normalise pre-activations with batch normalisation (or LayerNorm)",
    'model = gradguard.insert_normalization(model, "batch")  # "layer" for LayerNorm',
    name="batchnorm",
)
RESIDUAL = Fix(
    "Add residual connections so the gradient has an identity path",
    "model = gradguard.residualize(model)  # x + alpha * block(x), alpha starting at 0 (SkipInit)",
    name="residual",
)
XAVIER = Fix(
    "Initialise with Xavier/Glorot scaling for sigmoid/tanh layers",
    'gradguard.init_(model, "xavier")',
    name="xavier_init",
)
CLIP = Fix(
    "Clip the gradient norm before the optimizer step",
    "gradguard.clip_grad_norm_(model.parameters(), max_norm=1.0)  # after backward(), before step()",
    name="clip_norm",
)
LOWER_LR = Fix(
    "Lower the learning rate (or warm it up)",
    "for g in optimizer.param_groups:\n    g['lr'] *= 0.1",
    name="lower_lr",
)
SMALLER_INIT = Fix(
    "Shrink the initial weights to variance 1/fan_in (LeCun) or 2/fan_in (He, ReLU)",
    'gradguard.init_(model, "auto")  # the scale each layer\'s activation needs',
    name="auto_init",
)
NORMALISE_INPUT = Fix(
    "Standardise the inputs (zero mean, unit variance per feature)",
    "model = gradguard.prepend_standardizer(model, x_train)  # or standardise the data set once",
    name="standardize_input",
)
SKIP_NONFINITE = Fix(
    "Skip steps whose gradient is not finite, and find the first module that produced it",
    'guard = gradguard.NonFiniteGuard(model, optimizer, policy="skip")\n'
    "print(gradguard.localize(model, (x, y), loss_fn))  # on the bad batch: the first bad module",
    name="guard",
)
LEAKY = Fix(
    "Use LeakyReLU/GELU, or a smaller learning rate, so units cannot stay at zero",
    "model = gradguard.swap_activation(model, nn.ReLU, lambda: nn.LeakyReLU(0.01))",
    name="leaky_relu",
)
BIAS_RESET = Fix(
    "Re-initialise the layer's bias at zero",
    "nn.init.zeros_(layer.bias)",
    name="zero_bias",
)
ADAM = Fix(
    "Use Adam: per-parameter step sizes do not shrink with the gradient",
    "optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)",
    name="adam",
)
GATED_RNN = Fix(
    "Use a gated recurrence (LSTM or GRU) instead of a vanilla RNN",
    "rnn = nn.LSTM(input_size, hidden_size, batch_first=True)  # or nn.GRU",
    name="gated_rnn",
)
ORTHOGONAL_RECURRENT = Fix(
    "Initialise the recurrent weights orthogonal (gain 1) so the state neither shrinks nor grows",
    "for name, w in rnn.named_parameters():\n"
    "    if name.startswith('weight_hh'):\n"
    "        nn.init.orthogonal_(w)",
    name="orthogonal_recurrent",
)

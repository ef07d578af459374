"""The remedies each finding kind proposes, with code a user can paste."""

from __future__ import annotations

from .finding import Fix

RELU_HE = Fix(
    "Use a ReLU-family activation with He (Kaiming) initialisation",
    "nn.ReLU()  # instead of nn.Sigmoid()/nn.Tanh()\n"
    "for m in model.modules():\n"
    "    if isinstance(m, nn.Linear):\n"
    "        nn.init.kaiming_normal_(m.weight, nonlinearity='relu'); nn.init.zeros_(m.bias)",
)
BATCHNORM = Fix(
    "Normalise pre-activations with batch normalisation (or LayerNorm)",
    "nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU())",
)
RESIDUAL = Fix(
    "Add residual connections so the gradient has an identity path",
    "def forward(self, x):\n    return x + self.block(x)",
)
XAVIER = Fix(
    "Initialise with Xavier/Glorot scaling for sigmoid/tanh layers",
    "nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain('tanh'))",
)
CLIP = Fix(
    "Clip the gradient norm before the optimizer step",
    "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)",
)
LOWER_LR = Fix(
    "Lower the learning rate (or warm it up)",
    "for g in optimizer.param_groups:\n    g['lr'] *= 0.1",
)
SMALLER_INIT = Fix(
    "Shrink the initial weights to variance 1/fan_in (LeCun) or 2/fan_in (He, ReLU)",
    "nn.init.kaiming_normal_(m.weight, nonlinearity='linear')  # variance 1/fan_in",
)
NORMALISE_INPUT = Fix(
    "Standardise the inputs (zero mean, unit variance per feature)",
    "x = (x - x.mean(0)) / (x.std(0) + 1e-8)",
)
SKIP_NONFINITE = Fix(
    "Skip steps whose gradient is not finite, and find the first module that produced it",
    "if all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):\n"
    "    optimizer.step()\n"
    "with torch.autograd.detect_anomaly():  # on the bad batch only: slow\n"
    "    loss_fn(model(x), y).backward()",
)
LEAKY = Fix(
    "Use LeakyReLU/GELU, or a smaller learning rate, so units cannot stay at zero",
    "nn.LeakyReLU(0.01)  # instead of nn.ReLU()",
)
BIAS_RESET = Fix(
    "Re-initialise the layer's bias at zero",
    "nn.init.zeros_(layer.bias)",
)

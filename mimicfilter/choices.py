"""User-facing choices, importable without torch (the CLI builds its options from them)."""

MIMIC_LAYER_PRESETS = {
    "image-proj": "the image tower's final projection (contrastive default)",
    "text-proj": "the text tower's final projection",
    "both-proj": "both towers' final projections",
    "image-last-mlp": "the MLP of the image tower's last transformer block",
    "head": "the linear classifier head (classification default)",
}
DEFAULT_MIMIC_LAYERS = {"contrastive": "image-proj", "classify": "head"}
TASKS = ("contrastive", "classify")
TRAIN_MODES = ("none", "head", "full")
# Proxy learning rate per task. Classification re-initialises a whole linear head, which must
# learn within the run for its scores to separate (Fashion-MNIST, 40% flipped labels: flagged-label
# F1 0.94 at 1e-3 versus 0.73 at 1e-4; docs/benchmarks.md). CLIP keeps the paper's 1e-4.
DEFAULT_LR = {"contrastive": 1e-4, "classify": 1e-3}

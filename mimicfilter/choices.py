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

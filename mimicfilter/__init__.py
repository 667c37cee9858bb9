"""mimicfilter: score and curate WebDataset shards with Grad-Mimic mimic scores.

The command line is ``mimicfilter`` (see ``mimicfilter --help``). The library API:

* :class:`GradMimic` re-weights batches by mimic score inside your own training loop;
* :func:`contrastive_per_sample_loss` / :func:`classification_per_sample_loss` give the per-sample
  losses it needs;
* :func:`mimicfilter.scoring.run_score` runs the ``score`` pipeline from Python.
"""

from importlib.metadata import PackageNotFoundError, version

from mimicfilter.errors import MimicfilterError

try:
    __version__ = version("mimicfilter")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

# torch-backed names load on first use, so `mimicfilter --help` and `filter` start without torch.
_LAZY = {
    "GradMimic": "mimicfilter.grad_mimic",
    "GradMimicStep": "mimicfilter.grad_mimic",
    "classification_per_sample_loss": "mimicfilter.mimic",
    "contrastive_per_sample_loss": "mimicfilter.mimic",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mimicfilter' has no attribute {name!r}")


__all__ = [
    "GradMimic",
    "GradMimicStep",
    "MimicfilterError",
    "__version__",
    "classification_per_sample_loss",
    "contrastive_per_sample_loss",
]

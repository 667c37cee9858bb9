"""mimicfilter: score and curate WebDataset shards with Grad-Mimic mimic scores.

The command line is ``mimicfilter`` (see ``mimicfilter --help``). The library API:

* :class:`GradMimic` re-weights batches by mimic score inside your own training loop;
* :func:`contrastive_per_sample_loss` / :func:`classification_per_sample_loss` give the per-sample
  losses it needs;
* :func:`mimicfilter.pipeline.run.run_score` runs the ``score`` pipeline from Python.

The package's layout is its data flow (docs/architecture.md): ``shards`` → ``pipeline`` (with
``mimic`` and ``execute``) → ``store``, then ``curate``, ``report`` and ``extrapolate``.
"""

from mimicfilter.errors import MimicfilterError
from mimicfilter.version import __version__


def __getattr__(name: str):
    # torch-backed names load on first use, so `mimicfilter --help` and `filter` start without torch.
    if name in ("GradMimic", "GradMimicStep"):
        from mimicfilter.mimic import grad_mimic

        return getattr(grad_mimic, name)
    if name in ("classification_per_sample_loss", "contrastive_per_sample_loss"):
        from mimicfilter.mimic import losses

        return getattr(losses, name)
    raise AttributeError(f"module 'mimicfilter' has no attribute {name!r}")


__all__ = [
    "GradMimic",
    "GradMimicStep",
    "MimicfilterError",
    "__version__",
    "classification_per_sample_loss",
    "contrastive_per_sample_loss",
]

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

from mimicfilter.grad_mimic import GradMimic, GradMimicStep  # noqa: E402
from mimicfilter.mimic import classification_per_sample_loss, contrastive_per_sample_loss  # noqa: E402

__all__ = [
    "GradMimic",
    "GradMimicStep",
    "MimicfilterError",
    "__version__",
    "classification_per_sample_loss",
    "contrastive_per_sample_loss",
]

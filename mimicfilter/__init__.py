"""mimicfilter: score and curate WebDataset shards with Grad-Mimic mimic scores."""

from importlib.metadata import PackageNotFoundError, version

from mimicfilter.errors import MimicfilterError

try:
    __version__ = version("mimicfilter")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["MimicfilterError", "__version__"]

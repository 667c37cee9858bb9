"""The installed version (``0.0.0+unknown`` when running from a source tree without installation)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mimicfilter")
except PackageNotFoundError:
    __version__ = "0.0.0+unknown"

"""model-kinship server: model kinship, merge recommendations and SLERP merges over gRPC."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("model-kinship")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+local"

"""diqa: perceptual image and video quality from the priors of latent diffusion models.

The public API is small and explicit. Importing ``diqa_cli`` is cheap: torch and
diffusers are imported only by the functions that need them.
"""

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "DiqaError",
    "DiqaWarning",
    "InputError",
    "Metric",
    "UsageError",
    "WeightsError",
    "create_metric",
    "get_method",
    "list_methods",
]

from diqa_cli.errors import DiqaError, DiqaWarning, InputError, UsageError, WeightsError  # noqa: E402
from diqa_cli.methods import get_method, list_methods  # noqa: E402  (light: no torch)

# The Python API imports torch; it is loaded on first use so that `import diqa_cli` (and the CLI's
# start-up) stays light.
_LAZY = {"create_metric": "diqa_cli.metric", "Metric": "diqa_cli.metric"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diqa_cli' has no attribute {name!r}")

"""diqa: perceptual image and video quality from the priors of latent diffusion models.

The public API is small and explicit. Importing ``diqa_cli`` is cheap: torch and
diffusers are imported only by the functions that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "get_method", "list_methods"]

from diqa_cli.methods import get_method, list_methods  # noqa: E402  (light: no torch)

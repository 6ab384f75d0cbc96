"""Quality maps: where in an image a method's score comes from (``diqa score --maps DIR``).

Convention, for every method: a map is a (H, W) float array at the input's own size in which
**low values mean "worse here"**. Raw maps are in the method's raw score units and are not
normalised; for display each map is scaled to [0, 1] per image (robustly: its 1st to 99th
percentile) and drawn in viridis over the image.

How a method's map is made (the spec's ``quality_map`` line, shown by ``diqa methods``):

* a model that implements :class:`diqa_cli.models.base.QualityMapModel` makes it from its own
  computation (DP-IQA and its student: the per-location contribution of the 8-channel feature map
  to the score through the head; GenzIQA and GenzVQA: the generic map integrated along the path
  from the blurred image, ``detail_map(steps=8)``; LGDM: the score drop when each cell of a 4 × 4
  grid is blurred, :func:`diqa_cli.maps.compute.blur_occlusion_map`);
* any other model gets the generic map (:func:`diqa_cli.maps.compute.detail_map`): the gradient of
  the score with respect to the pixels times the image's fine detail (the image minus a blurred
  copy of it), summed over colour and smoothed.

Modules: :mod:`~diqa_cli.maps.compute` (torch: the maps), :mod:`~diqa_cli.maps.render` (numpy and
Pillow: the overlay picture) and :mod:`~diqa_cli.maps.writer` (the two files per input). Only
``compute`` imports torch.
"""

__all__ = ["MAP_COLUMN"]

# The output column that names the overlay PNG written for a row.
MAP_COLUMN = "map"

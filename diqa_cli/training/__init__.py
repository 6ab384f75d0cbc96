"""Training, distillation and evaluation of quality heads on a labels CSV; SRCC / PLCC / KRCC.

A labels CSV has the columns ``path`` and ``mos`` and optionally ``split`` (``train`` / ``test`` /
anything else), or others named with :func:`labels_source`; relative paths are resolved against the
CSV's folder. The published label files of KonIQ-10k, LIVE Challenge, SPAQ, KADID-10k, KoNViD-1k
and LIVE-VQC are read through presets (:mod:`.presets`). The paths are images, or videos for a
video method (GenzVQA, whose SlowFast features are computed once per video).

What diqa does the same for every method, and where that departs from the released code:

* MOS is mapped to [0, 1] with the training split's minimum and range (``offset``, ``scale``),
  recorded in the sidecar; reported scores are ``raw * scale + offset``, back on the MOS scale.
  DP-IQA's released code divides MOS by 100 by hand; GenzIQA's trains on raw MOS. An affine map
  does not change rankings, but it does change the loss scale the learning rate meets.
* One optimiser, AdamW, with per-method defaults from the released code (``MethodSpec.training``;
  AdamW with weight decay 0 is exactly the Adam DP-IQA uses). The learning rate is constant:
  DP-IQA's MultiStepLR milestones are per dataset, and a user can run again with ``--init``.
* Seeded: parameter initialisation, batch order and any noise a method draws come from ``seed``,
  recorded in the sidecar; on the CPU the same command gives the same head, tensor for tensor. On
  CUDA it does not quite: some backward kernels (bicubic upsampling's, among others) add with
  atomics in no fixed order (measured on an H200: weights 0.02 apart after 2 epochs of DP-IQA).
* On half precision (``--dtype fp16|bf16``) the trainable parameters are kept in float32 and the
  forward pass runs under autocast, with a gradient scaler for fp16, as DP-IQA's released training.
* No model selection on the test split (DP-IQA's released code keeps the epoch with the best test
  correlation); the head after the last epoch is saved.
* Images are decoded once and, when the set fits in :data:`PRELOAD_BYTES`, kept in memory as
  float16 at the model's resolution; larger sets are decoded batch by batch.
* Methods whose frozen features do not depend on trainable parameters
  (:class:`~diqa_cli.models.base.CachedFeatures`, LGDM) have their features computed once per image
  and the head trained on them, which costs one feature pass per image instead of one per epoch.
* Images are resized with the method's own filter (``MethodSpec.resample``), as scoring does.

Modules: :mod:`.labels` (labels CSVs, MOS normalisation), :mod:`.presets` (published label files),
:mod:`.loop` (:func:`train`), :mod:`.distill` (:func:`distill`), :mod:`.evaluate` (:func:`evaluate`,
:func:`correlations`).

Metrics: SRCC, PLCC and KRCC from :mod:`scipy.stats`; PLCC is computed on the scores as they
are, without the 4-parameter logistic fit some papers apply first, as DP-IQA's released
``metrics.py`` does.
"""

from diqa_cli.methods import TrainingDefaults
from diqa_cli.training.distill import distill
from diqa_cli.training.evaluate import correlations, evaluate
from diqa_cli.training.labels import LabelRow, LabelsSource, labels_source, read_labels, select_split
from diqa_cli.training.loop import train

__all__ = [
    "LabelRow",
    "LabelsSource",
    "labels_source",
    "TrainingDefaults",
    "read_labels",
    "select_split",
    "correlations",
    "train",
    "distill",
    "evaluate",
]

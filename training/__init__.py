"""Training and evaluation around the ``ssd_post`` library (not part of its wheel).

- :mod:`training.config`: the typed YAML config schema, all defaults, ``load_config``.
- :mod:`training.data`: the shapes data set, COCO-format reader, augmentation.
- :mod:`training.lightning_module`: Lightning DataModule and training module.
- :mod:`training.evaluation`: COCO mAP, per-stage timing, pictures.

Like torchvision's ``references/detection``, this lives in the repository beside
``models/`` and is run from its root (``train.py``, ``evaluate.py``); it needs the
``[train]`` extra. Submodules are imported where used: ``import training`` is free.
"""

"""Data for training and evaluating SSD detectors.

- :mod:`.shapes`: the generated shapes data set (``ensure_shapes_dataset``).
- :mod:`.coco`: ``CocoDetectionDataset`` for any COCO-format set, and ``collate_fn``.
- :mod:`.transforms`: albumentations pipelines (``train_transforms``, ``eval_transforms``).

Training code, outside the ``ssd_post`` wheel: it needs the ``[train]`` extra
(albumentations, OpenCV, pycocotools, numpy).
"""

"""Data for training and evaluating SSD detectors.

- :mod:`.shapes`: the generated shapes data set (``ensure_shapes_dataset``).
- :mod:`.coco`: ``CocoDetectionDataset`` for any COCO-format set, and ``collate_fn``.
- :mod:`.transforms`: albumentations pipelines (``train_transforms``, ``eval_transforms``).

The submodules are imported where they are used, so ``import ssd_post`` stays free
of albumentations, OpenCV and pycocotools.
"""

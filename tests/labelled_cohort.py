"""A datastore of synthetic labelled volumes for trainer tests: the four datastore calls the trainer makes, over
folders (the fixture ``cohort_datastore`` in conftest.py builds one)."""

from __future__ import annotations

LABELS = {"right_caudate": 2, "right_putamen": 4}  # the labels the cohort holds


class FolderDatastore:
    """The four datastore calls the trainer makes, over a folder of images and a folder of final labels."""

    def __init__(self, images, labels, names):
        self.images, self.labels, self.names = images, labels, names

    def get_labeled_images(self, tag=None, labels=None):
        return list(self.names)

    def get_label_by_image_id(self, image_id, tag):
        return image_id

    def get_image_uri(self, image_id):
        return str(self.images / f"{image_id}.nii.gz")

    def get_label_uri(self, label_id, tag):
        return str(self.labels / f"{label_id}.nii.gz")

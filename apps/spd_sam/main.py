"""SPD-SAM MONAI Label app: registers the ``spd_sam`` infer task and guards the app's entry points."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Dict

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib.configs.spd_sam import SPDSamConfig

logger = logging.getLogger(__name__)

IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,255}$")  # datastore ids: no paths, no traversal


class SPDSamApp(MONAILabelApp):
    """MONAI Label app serving SPD segmentation from weak clicks."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        self.model_dir = os.path.join(app_dir, "model")
        os.makedirs(self.model_dir, exist_ok=True)
        self.spd = SPDSamConfig()
        self.spd.init("spd_sam", self.model_dir, conf, None)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SPD-SAM",
            description="Saliency-guided prompt distillation for SAM: 3D masks from rough clicks",
            version="0.1.0",
            labels=self.spd.labels,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        return {"spd_sam": self.spd.infer()}

    def init_trainers(self):
        return {}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def next_sample(self, request):
        """Propose an image and start embedding it in the background, so the first click is fast."""
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise HTTPException(status_code=404,
                                detail=f"unknown strategy {strategy!r}; available: {', '.join(self._strategies)}")
        result = super().next_sample(request)
        if result.get("path"):
            self._infers["spd_sam"].prefetch(result["path"])
        return result

    def infer(self, request, datastore=None):
        """Reject unknown models and image ids before MONAI Label resolves them to files."""
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; available: {', '.join(self._infers)}")
        image = request.get("image")
        if isinstance(image, str) and not self._is_upload(image):
            if not IMAGE_ID.match(image):
                raise HTTPException(status_code=400, detail=f"invalid image id {image!r}: ids are names, not paths")
            store = datastore or self.datastore()
            if image not in store.list_images():
                raise HTTPException(status_code=404, detail=f"unknown image id {image!r}")
        return super().infer(request, datastore)

    @staticmethod
    def _is_upload(image: str) -> bool:
        """Files uploaded with the request are written by MONAI Label into the temp folder."""
        return os.path.dirname(os.path.abspath(image)) == os.path.abspath(tempfile.gettempdir()) and os.path.isfile(image)

"""SPD-SAM MONAI Label app: registers the ``spd_sam`` infer task and guards the app's entry points."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Dict

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib.auth.token_algorithms import name_token_algorithms
from lib.configs.spd_sam import SPDSamConfig
from lib.datastore.dicomweb_conversions import TempConversionsRemoved
from lib.datastore.label_uploads import check_image_id, with_checked_label_saves
from lib.infers import download_prefetch, request_guard
from lib.spd.atomic_files import remove_stale_temps
from lib.volume_io import volume_id

logger = logging.getLogger(__name__)

DICOMWEB_SEARCH_FILTER = {"Modality": "CT,MR"}  # QIDO-RS list matching: CT and MR series, not SEG/SR/...
DCMQI_TOOL = "itkimage2segimage"  # dcmqi's DICOM-SEG writer (PyPI package dcmqi), used for final labels


class SPDSamApp(MONAILabelApp):
    """MONAI Label app serving SPD segmentation from weak clicks."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        self.model_dir = os.path.join(app_dir, "model")
        os.makedirs(self.model_dir, exist_ok=True)
        if settings.MONAI_LABEL_AUTH_ENABLE:
            name_token_algorithms()
        try:
            request_guard.install()
        except request_guard.RouteMoved as error:
            logger.error("malformed infer requests will get MONAI Label's 500s: %s", error)
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
        try:
            download_prefetch.install(self._infers["spd_sam"].prefetch)
        except request_guard.RouteMoved as error:
            logger.error("opening an image will not start embedding it: %s", error)
        self._forget_embeddings_of_gone_volumes()
        self._remove_stale_temps()

    def _remove_stale_temps(self) -> None:
        """Delete the temp files of atomic writes (labels, datastore JSON, checkpoints, cached embeddings) that a
        killed server left behind."""
        folders = [self.model_dir, self.spd.store.directory, self.spd.pipeline.cache.directory]
        if os.path.isdir(self.studies):  # a local studies folder: its labels and datastore_v2.json
            folders.append(self.studies)
        folders = {Path(f).resolve() for f in folders if f}
        outermost = [f for f in folders if not any(f != g and f.is_relative_to(g) for g in folders)]  # walked once
        removed = sum(remove_stale_temps(folder) for folder in outermost)
        if removed:
            logger.warning("deleted %d temp file(s) of writes cut short by an earlier kill", removed)

    def _forget_embeddings_of_gone_volumes(self) -> None:
        """Delete the cached embeddings of volumes removed or replaced since they were embedded (local datastores:
        a DICOMweb datastore fetches files on demand, so it cannot say what is gone)."""
        store = self.datastore()
        if isinstance(store, DICOMWebDatastore) or not isinstance(store, LocalDatastore):
            return
        ids = set()
        for image in store.list_images():
            with suppress(OSError):
                ids.add(volume_id(store.get_image_uri(image)))
        removed = self.spd.pipeline.cache.retain(ids)
        logger.info("embedding cache: %d slice(s) of volumes no longer in the datastore deleted; %s", removed,
                    self.spd.pipeline.cache.usage())

    def init_datastore(self) -> Datastore:
        """MONAI Label's datastore, with label uploads checked (shape, readability, tag) and saved all-or-nothing;
        a DICOMweb one converts series to NIfTI without leaving copies in the temp folder."""
        store = super().init_datastore()
        if type(store) is DICOMWebDatastore:
            store.__class__ = TempConversionsRemoved  # a subclass without state of its own
        return with_checked_label_saves(store)

    def init_infers(self) -> Dict[str, InferTask]:
        return {"spd_sam": self.spd.infer(), "spd_sam_auto": self.spd.auto_infer()}

    def init_trainers(self):
        return {"spd_sam": self.spd.trainer()}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First(), "spd_uncertainty": self.spd.strategy()}

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        return {"spd_uncertainty": self.spd.scoring_method()}

    def async_scoring(self, method, params=None):
        """Start background scoring only when a volume lacks a score from the published model.

        MONAI Label scores at start-up, after every next-sample request and after training; each
        run is a subprocess that loads the app again, too costly to start for nothing.
        """
        scoring = self._scoring_methods.get("spd_uncertainty")
        if method is None and scoring is not None and not scoring.pending(self.datastore()):
            return {}
        return super().async_scoring(method, params)

    def next_sample(self, request):
        """Propose an image and prepare it in the background: its auto segmentation once a structure is learned
        (``spd_sam_auto`` then answers at once; ``"spd_sam_auto": "computing"`` in the answer), else its
        embeddings, so the first click is fast."""
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise HTTPException(status_code=404,
                                detail=f"unknown strategy {strategy!r}; available: {', '.join(self._strategies)}")
        result = super().next_sample(request)
        if result.get("path"):
            ahead = self._infers["spd_sam_auto"].precompute(result["path"])  # embeds the volume on its way
            if not ahead:
                self._infers["spd_sam"].prefetch(result["path"])
            result["spd_sam_auto"] = "computing" if ahead else "nothing learned yet"
        return result

    def infer(self, request, datastore=None):
        """Reject unknown models and image ids before MONAI Label resolves them to files."""
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; available: {', '.join(self._infers)}")
        image = request.get("image")
        if isinstance(image, str) and not self._is_upload(image):
            check_image_id(datastore or self.datastore(), image)
        return super().infer(request, datastore)

    def info(self):
        """``/info/``: top-level ``labels`` as names in index order, the form MONAI Label gives when an app sets none.

        OHIF's MONAI Label panel appends the models' labels to this list (``labels.push``) and fails to
        connect when it is a name->index map; 3D Slicer iterates over it either way. Each model's ``labels``
        keeps the name->index map. ``embedding_cache`` reports the cache's disk and memory use.
        """
        meta = super().info()
        labels = meta.get("labels")
        if isinstance(labels, dict):
            meta["labels"] = [name for name, _ in sorted(labels.items(), key=lambda item: item[1])]
        meta["embedding_cache"] = self.spd.pipeline.cache.usage()
        return meta

    def _init_dicomweb_datastore(self) -> Datastore:
        """List CT and MR series of a DICOMweb store unless the operator set MONAI_LABEL_DICOMWEB_SEARCH_FILTER.

        MONAI Label's own default lists CT only, so MR series could be neither proposed nor segmented.
        The choice is exported to the environment, which the train and scoring subprocesses inherit
        (MONAI Label writes its defaults there, where they would look set by the operator).
        """
        if "MONAI_LABEL_DICOMWEB_SEARCH_FILTER" not in settings.model_fields_set:
            settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER = DICOMWEB_SEARCH_FILTER
            os.environ["MONAI_LABEL_DICOMWEB_SEARCH_FILTER"] = json.dumps(DICOMWEB_SEARCH_FILTER)
        logger.info(f"DICOMweb search filter: {settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER}")
        return super()._init_dicomweb_datastore()

    def _download_dcmqi_tools(self) -> None:
        """Find dcmqi's DICOM-SEG writer in the Python environment instead of downloading it at start.

        MONAI Label writes a ``final`` label into a DICOMweb store as DICOM-SEG with ``itkimage2segimage``;
        the ``dcmqi`` wheel installs it beside the interpreter, which is not on PATH unless the venv is active.
        """
        env_bin = os.path.dirname(sys.executable)
        if not shutil.which(DCMQI_TOOL) and shutil.which(DCMQI_TOOL, path=env_bin):
            os.environ["PATH"] += os.pathsep + env_bin
        tool = shutil.which(DCMQI_TOOL)
        if tool:
            logger.info(f"DICOM-SEG writer: {tool}")
        else:
            logger.warning(f"{DCMQI_TOOL} not found (pip install dcmqi): saving final labels to DICOMweb will fail")

    @staticmethod
    def _is_upload(image: str) -> bool:
        """Files uploaded with the request are written by MONAI Label into the temp folder."""
        return os.path.dirname(os.path.abspath(image)) == os.path.abspath(tempfile.gettempdir()) and os.path.isfile(image)

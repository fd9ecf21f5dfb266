"""Makes the app importable the way MONAI Label imports it: the app folder on sys.path, packages ``lib.*``."""

import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent / "apps" / "spd_sam"
sys.path.insert(0, str(APP_DIR))

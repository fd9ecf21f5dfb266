"""The one path set-up of scripts and tests: importing this module puts the app folder (packages ``lib.*``, as
MONAI Label imports them) and ``scripts/`` on ``sys.path``. Scripts import it first; tests/conftest.py does
(``pytest.ini`` puts ``scripts/`` on the path for that)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "spd_sam"

for folder in (ROOT / "scripts", APP_DIR):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

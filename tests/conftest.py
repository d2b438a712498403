# Lets the tests import the top-level scripts (kernels_triton, labels, ferkd) without installing a package.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

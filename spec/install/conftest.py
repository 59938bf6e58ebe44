"""The install-path specs reuse the integration harness (spec/integration/harness.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

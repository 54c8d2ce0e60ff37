import sys
from pathlib import Path

# The export package is imported from the source tree (the fixtures live in ../../conftest.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

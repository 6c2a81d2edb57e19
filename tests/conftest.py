"""Test-wide setup: a private cache directory (kernel dispositions, compiled ops stay shared)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # shared test helpers (references, fixture writers)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

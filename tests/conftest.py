import os
import sys

# Test-only fakes (core_fakes.py, ...) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

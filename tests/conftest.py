"""Test setup: the torchvision stand-in for segment-anything, shared fixtures."""
import os
import sys

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
sys.path.insert(0, os.path.dirname(__file__))

import torchvision_shim  # noqa: E402

torchvision_shim.install()

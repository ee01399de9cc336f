"""Ends its process at import time with status 0 (the old gate then exited 0)."""

import os

os._exit(0)

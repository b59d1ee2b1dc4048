"""Apache Beam pipeline: raw interaction logs to TFRecord session sequences."""
import os

# The project's version (setup.py's; every command's --version, stats.json's
# `pipeline_version`, an export's `export_config.json`).
__version__ = "0.1.0"

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

"""Packages `pipeline/` for Beam's remote workers.

Dataflow (and any runner whose workers do not share this checkout) installs this with
`--setup_file ./setup.py`: Beam builds a source distribution of it and installs it on
every worker, so that the workers can import `pipeline.transforms`. The workers need
Apache Beam (their container has it), NumPy, a CRC library for Beam's TFRecord writer
(google-crc32c: Beam alone cannot write the records) and cramjam for snappy-compressed
Avro inputs, not TensorFlow (the records are encoded by `pipeline.schema` itself). The
model and serving code are not packaged: they run where this repository is checked out.
Python 3.10 is enough for the workers (the commands' pinned requirements need 3.11).
"""
import os
import re

import setuptools

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipeline", "__init__.py"),
          encoding="utf-8") as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)

setuptools.setup(
    name="hiertcn-pipeline",
    version=VERSION,
    description="HierTCN's Apache Beam pipeline: interaction logs to TFRecord sessions",
    packages=["pipeline"],
    python_requires=">=3.10",
    install_requires=["numpy", "google-crc32c", "cramjam"],
)

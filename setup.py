"""Packages `pipeline/` for Beam's remote workers.

Dataflow (and any runner whose workers do not share this checkout) installs this with
`--setup_file ./setup.py`: Beam builds a source distribution of it and installs it on
every worker, so that the workers can import `pipeline.transforms`. The workers need
Apache Beam (their container has it) and NumPy, not TensorFlow (the records are encoded
by `pipeline.schema` itself). The model and serving code are not packaged: they run
where this repository is checked out.
"""
import setuptools

setuptools.setup(
    name="hiertcn-pipeline",
    version="0.1.0",
    description="HierTCN's Apache Beam pipeline: interaction logs to TFRecord sessions",
    packages=["pipeline"],
    python_requires=">=3.10",
    install_requires=["numpy"],
)

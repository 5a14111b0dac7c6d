"""gan_dist: a GAN trainer that scales from a CPU to a SLURM cluster."""

# The one place the version is written: pyproject.toml reads it (setuptools' dynamic version)
# and run.json records it.
__version__ = "0.1.0"

"""Training machinery: configs, checkpoints, distributed helpers, metrics logging.

Submodules are imported explicitly (``from detdistill.engine.config import
load_config``) so that reading a config does not pull in TensorBoard or start
CUDA.
"""

"""HierTCN and baselines in tf.keras, trained with the queue-based mini-batch generator."""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

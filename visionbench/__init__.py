"""visionbench: a benchmark harness for vision pretraining and transfer."""

__version__ = "0.1.0"

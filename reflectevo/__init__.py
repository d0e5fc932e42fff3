"""reflectevo: self-reflection learning (ReflectEvo) for small LLMs, written out by hand on PyTorch + Triton."""

__version__ = "0.1.0"

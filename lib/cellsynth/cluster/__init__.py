"""Where stages run: the embedded default (Spark local, Ray in-process) or a cluster.
Only this package creates Spark sessions or starts Ray."""

from cellsynth.cluster.runtime import Runtime, make_lake, runtime

__all__ = ["Runtime", "make_lake", "runtime"]

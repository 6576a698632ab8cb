"""Exact k nearest neighbours: input checks (:mod:`.inputs`), the points (:mod:`.points`), the pipeline
(:mod:`.pipeline`: candidates -> exact re-rank -> certificate -> fallback, and the public ``knn2``), the
certificate (:mod:`.certify`), the float64 reference and fallback (:mod:`.reference`), the engines
(:mod:`.engines`). Nothing is imported here, so that the modules import in any order; the public names
are ``gelora.knn2`` and ``gelora.knn_reference``."""

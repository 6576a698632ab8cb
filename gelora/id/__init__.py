"""Intrinsic-dimension estimators on top of the exact kNN pipeline: the estimators and their result
(:mod:`.estimate`), the duplicates policy (:mod:`.dedup`), the public TwoNN API (:mod:`.twonn`). Nothing
is imported here, so that the modules import in any order; the public names are ``gelora.twonn``,
``gelora.estimate_id``, ``gelora.id_scale_curve``, ``gelora.TwoNNResult``, ``gelora.unique_rows``."""

"""Intrinsic-dimension estimators on top of the exact kNN pipeline: the TwoNN estimators and their result
(:mod:`.estimate`), the duplicates policy (:mod:`.dedup`), the public TwoNN API (:mod:`.twonn`), and the
multiscale estimators, GRIDE (:mod:`.gride`) and the Levina-Bickel MLE over k neighbours (:mod:`.mle`),
on the k-neighbour search of :mod:`.kneighbours`. Nothing is imported here, so that the modules import
in any order; the public names are ``gelora.twonn``, ``gelora.estimate_id``, ``gelora.id_scale_curve``,
``gelora.TwoNNResult``, ``gelora.unique_rows``, ``gelora.gride``, ``gelora.GrideResult``,
``gelora.mle_id``, ``gelora.MleResult``."""

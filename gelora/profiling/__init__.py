"""Per-layer intrinsic dimensions of a transformers model: its structure (:mod:`.structure`: the blocks,
the LoRA-able linear modules), what enters a profile (:mod:`.sampler`: batches and the bottom-k sampler),
the hooks that collect the hidden states (:mod:`.hooks`), the driver (:mod:`.driver`:
:func:`profile_model`) and what it returns (:mod:`.results`). Nothing is imported here, so that the
modules import in any order; the public names are ``gelora.profile_model``, ``gelora.ProfileResult`` and
``gelora.ModuleProfile``."""

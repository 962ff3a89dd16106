"""Model builders used by name for students (and teachers) in recipes.

``mlp``, ``cnn``, ``hf_causal_lm``, ``hf_classifier``, ``hf_embedder``, ``hf_config``, ``llama``,
``layer_drop``, ``shrink``, ``prune``, ``tfidf_mlp``, ``mlp_denoiser``, ``unet_denoiser`` and
``hf:<path>`` (a user's own model).
"""

from mentor.students import (
    denoiser_builders,  # noqa: F401  (registers the diffusion denoiser builders)
    hf_builders,  # noqa: F401  (registers the HF and TF-IDF builders)
    prune_builder,  # noqa: F401  (registers the prune builder)
)
from mentor.students.builders import BUILDERS, build_model, load_model, save_model
from mentor.students.vocab import VocabMismatchError, check_vocab, reconcile

__all__ = [
    "BUILDERS",
    "VocabMismatchError",
    "build_model",
    "check_vocab",
    "load_model",
    "reconcile",
    "save_model",
]

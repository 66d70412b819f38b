"""``te_llama.AutoModelForCausalLM``: the te-llama class of a checkpoint's (or config's) model family.

Like transformers' ``AutoModelForCausalLM`` it reads ``model_type`` and hands over to the family's class, which is
HF's class of that family with te-llama's decoder layers: ``model_type`` ``"mistral"`` gives a
:class:`TEMistralForCausalLM`, an instance of ``transformers.MistralForCausalLM``. The arguments are those of
:meth:`te_llama.model.modeling.TECausalLM.from_pretrained` and ``from_config``.
"""

from __future__ import annotations

import os

from te_llama.model.families import family_of
from te_llama.model.modeling import (TECausalLM, TELlamaForCausalLM, TEMistralForCausalLM, TEQwen2ForCausalLM,
                                     TEQwen3ForCausalLM, checkpoint_directory, checkpoint_family)

CLASSES: dict[str, type[TECausalLM]] = {cls.te_family.model_type: cls for cls in (
    TELlamaForCausalLM, TEMistralForCausalLM, TEQwen2ForCausalLM, TEQwen3ForCausalLM)}


class AutoModelForCausalLM:
    """Builds the te-llama class of a model's family; not instantiated itself."""

    def __init__(self, *args, **kwargs):
        raise TypeError("te_llama.AutoModelForCausalLM is not instantiated: use AutoModelForCausalLM.from_pretrained"
                        "(path, ...) or AutoModelForCausalLM.from_config(config, ...)")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> TECausalLM:
        """The local checkpoint ``path`` loaded into its family's te-llama class (arguments: ``TECausalLM``'s)."""
        family = checkpoint_family(checkpoint_directory(path, kwargs.get("subfolder")))
        return CLASSES[family.model_type].from_pretrained(path, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs) -> TECausalLM:
        """A randomly initialised model of ``config``'s family (arguments: ``TECausalLM.from_config``'s)."""
        return CLASSES[family_of(config).model_type].from_config(config, **kwargs)

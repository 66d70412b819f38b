"""Let transformers' ``pipeline("text-generation", model=te_llama_model)`` run without its "not supported" error.

The pipeline compares the model's class name with the class names in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``
(model type -> class name) and logs a list of ~250 models when it is absent, though generation works. Registering
te-llama through ``AutoModelForCausalLM.register`` would need ``LlamaConfig`` as the key, which would make every
``AutoModelForCausalLM`` Llama a te-llama model. So the class name goes into the names table under a model type
no config has (``"te_llama"``): the auto classes only look names up for config model types, so nothing else changes.
"""

from __future__ import annotations

MODEL_TYPE = "te_llama"


def register_text_generation_name(class_name: str) -> None:
    """Make ``class_name`` one of the causal LMs the text-generation pipeline accepts (idempotent). Each family's
    class is one more name in a tuple, which the pipeline's check reads as several classes of one model type."""
    from transformers.models.auto.modeling_auto import CONFIG_MAPPING_NAMES, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if MODEL_TYPE in CONFIG_MAPPING_NAMES:  # a real model type of that name: leave transformers' tables alone
        return
    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(MODEL_TYPE, ())
    if class_name not in names:
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[MODEL_TYPE] = (*names, class_name)

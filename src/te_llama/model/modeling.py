"""``TELlamaForCausalLM`` (and ``TEMistralForCausalLM``, ``TEQwen2ForCausalLM``, ``TEQwen3ForCausalLM``): HF's causal
LM of each family whose decoder layers are ``TELlamaDecoderLayer``; :class:`TECausalLM` is what they add to HF's.

Embeddings, final norm, LM head, ``generate()`` and the ``Trainer`` interface stay HF's. Loading reads a
local HF checkpoint directory straight into TE's parameters; saving writes the family's standard HF layout back.
Training forwards with labels compute the LM head and loss in chunks (:mod:`te_llama.model.lm_head_loss`).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import (GenerationConfig, LlamaForCausalLM, MistralForCausalLM, PretrainedConfig, Qwen2ForCausalLM,
                          Qwen3ForCausalLM)
from transformers.initialization import no_init_weights
from transformers.modeling_outputs import CausalLMOutputWithPast

from te_llama import te_patches
from te_llama.backend import default_device, resolve_backend
from te_llama.checkpoint.files import CheckpointError, weight_files, write_checkpoint
from te_llama.generation.decode_graphs import DecodeGraphs
from te_llama.training.cuda_graphs import CudaGraphError, GraphPeers, release_layer_graphs
from te_llama.training.distributed import is_sharded, several_processes
from te_llama.training.fp8 import FP8Config, FP8ConfigError, check_fp8_possible, describe, parse_fp8, resolve_recipe_name
from te_llama.training import fp8_weights
from te_llama.model.adapters import has_adapters
from te_llama.model.decoder_stack import TEDecoderStack
from te_llama.model.families import (LLAMA, MISTRAL, QWEN2, QWEN3, Family, UnsupportedConfigError, check_config,
                                     family_for, supported_model_types)
from te_llama.model.hf_arguments import loading_arguments
from te_llama.model.lm_head_loss import linear_cross_entropy
from te_llama.checkpoint.loading import copy_hf_tensor, load_hf_weights
from te_llama.model.patching import replace_decoder_layer
from te_llama.model.pipelines import register_text_generation_name
from te_llama.checkpoint.weight_mapping import hf_names, hf_target, te_to_hf

logger = logging.getLogger("te_llama")


@functools.cache
def _say_once(message: str) -> None:
    logger.info(message)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(value, config=None) -> torch.dtype:
    """A torch dtype from a dtype, a name, or ``"auto"``/``None`` (the config's dtype, else float32)."""
    if isinstance(value, torch.dtype):
        return value
    if value is None or value == "auto":
        value = getattr(config, "dtype", None) or "float32"
        if isinstance(value, torch.dtype):
            return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {value!r}; use one of: {', '.join(sorted(_DTYPES))}, auto")
    return _DTYPES[name]


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def checkpoint_directory(path: str | os.PathLike, subfolder: str | None = None) -> Path:
    """The local checkpoint directory ``path`` (``/subfolder``), or a :class:`CheckpointError` that says what to do."""
    directory = Path(path) / subfolder if subfolder else Path(path)
    if not directory.is_dir():
        raise CheckpointError(
            f"{path}: not a directory. te-llama loads local Hugging Face checkpoints; download one first "
            "(for example `hf download ORG/MODEL --local-dir DIR`)."
        )
    return directory


def checkpoint_family(directory: Path) -> Family:
    """The family of a local checkpoint, from its ``config.json``, with errors that name the file."""
    path = directory / "config.json"
    if not path.is_file() and (directory / "adapter_config.json").is_file():
        raise CheckpointError(
            f"{directory}: a PEFT adapter directory (adapter_config.json, as te-llama finetune --lora writes), not a "
            "model; use the merged checkpoint (finetune --merge-lora writes it to OUTPUT/merged), or load the base "
            "model and then the adapter with peft.PeftModel.from_pretrained(model, directory)")
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json; is this a Hugging Face model directory?")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from error
    try:
        return family_for(raw.get("model_type"))
    except UnsupportedConfigError as error:
        raise CheckpointError(f"{path}: {error}") from error


def read_config(directory: Path, family: Family | None = None) -> PretrainedConfig:
    """``config.json`` of a local checkpoint as its family's config class (``LlamaConfig``, ...); ``family``: the one
    it must be (:class:`CheckpointError` otherwise)."""
    found = checkpoint_family(directory)
    if family is not None and found is not family:
        raise CheckpointError(
            f"{directory / 'config.json'}: model_type is {found.model_type!r}, not {family.model_type!r}; load it "
            f"with te_llama.AutoModelForCausalLM, which picks the family's class (model types "
            f"{supported_model_types()})")
    return found.config_class.from_pretrained(directory)


class TECausalLM:
    """What te-llama adds to a family's HF causal LM (``LlamaForCausalLM``, ``MistralForCausalLM``, ...): Transformer
    Engine decoder layers (or the reference layer on CPU), checkpoints in and out, FP8, CUDA graphs, the chunked
    LM-head loss. Each family's class puts it first among its bases, before HF's class, and names its ``te_family``."""

    te_family: Family
    _no_split_modules = ["TELlamaDecoderLayer"]
    model: TEDecoderStack

    def __init__(self, config: PretrainedConfig, backend: str | None = None, fp8: FP8Config | str | None = None):
        backend = resolve_backend(backend)
        if check_config(config) is not self.te_family:
            raise UnsupportedConfigError(
                f"model_type is {config.model_type!r}; {type(self).__name__} runs model_type "
                f"{self.te_family.model_type!r}. te_llama.AutoModelForCausalLM builds each of "
                f"{supported_model_types()} as its family's class")
        config = copy.deepcopy(config)
        hf_use_cache = config.use_cache
        # Plain forwards build no KV cache (training and scoring keep TE's fused layers); generate() asks for one
        # through its generation config, as HF's does, and the layers then run with it (kv_cache.py).
        config.use_cache = False
        config._attn_implementation = "sdpa"  # HF builds masks for SDPA; layers convert them for TE
        with replace_decoder_layer(backend):
            super().__init__(config)
        self.te_backend = backend
        self._hf_use_cache = hf_use_cache
        register_text_generation_name(type(self).__name__)
        self.generation_config.use_cache = hf_use_cache
        self.chunked_lm_head_loss = True
        """Training forwards with labels compute LM head + loss without HF's float32 logits and return no logits
        (see :mod:`te_llama.model.lm_head_loss`); ``False`` restores HF's full-logits path."""
        if fp8 is not None:
            self.enable_fp8(fp8)

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def from_config(cls, config: PretrainedConfig, *, torch_dtype=None, dtype=None, device=None,
                    backend: str | None = None, fp8: FP8Config | str | None = None) -> TECausalLM:
        """A randomly initialised model (HF's init: normal(0, initializer_range) weights, unit norms)."""
        backend = resolve_backend(backend)
        dtype = resolve_dtype(dtype or torch_dtype or torch.float32)
        with default_dtype(dtype), torch.device(device or default_device(backend)):
            return cls(config, backend=backend, fp8=fp8)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, torch_dtype=None, dtype=None, device=None,
                        backend: str | None = None, fp8: FP8Config | str | None = None,
                        **hf_kwargs) -> TECausalLM:
        """Load a local HF checkpoint of the class's family (safetensors or ``.bin``, single or sharded) into TE
        layers.

        ``dtype``/``torch_dtype``: a torch dtype, a name (``"bfloat16"``) or ``"auto"`` (the checkpoint's).
        ``device``: where the model lives (default: CUDA for the TE backend, CPU for the reference).
        ``fp8``: an :class:`FP8Config` or recipe name to train in FP8 (see :meth:`enable_fp8`).
        HF's loading arguments: see :func:`te_llama.model.hf_arguments.loading_arguments`.
        """
        device, subfolder = loading_arguments(hf_kwargs, device)
        directory = checkpoint_directory(path, subfolder)
        config = read_config(directory, cls.te_family)
        files = weight_files(directory)
        backend = resolve_backend(backend)
        dtype = resolve_dtype(dtype or torch_dtype, config)
        with default_dtype(dtype), torch.device(device or default_device(backend)), no_init_weights():
            model = cls(config, backend=backend)
        model.tie_weights()
        load_hf_weights(model, directory, files, cls.te_family.weights)
        # As HF records it: PEFT writes it into an adapter's base_model_name_or_path, lm-eval into its results
        model.name_or_path = model.config._name_or_path = str(path)
        if (directory / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(directory)
        model.eval()
        if fp8 is not None:
            model.enable_fp8(fp8)
        return model

    # -------------------------------------------------------------------------------------------------- FP8
    def enable_fp8(self, fp8: FP8Config | str = "auto") -> TECausalLM:
        """Run the decoder layers under ``te.autocast`` with this recipe from now on (forward pass only).

        Training forwards always use FP8; ``model.eval()`` forwards (evaluation, ``generate()``) use BF16
        unless ``FP8Config(in_eval=True)``. Embeddings, final norm and LM head stay in high precision. This holds
        wherever the decoder layers run, also when a tool calls ``model.model`` directly (TRL's fused LM head).
        Raises :class:`FP8ConfigError` where FP8 cannot run; there is no silent BF16 fallback.
        """
        config = parse_fp8(fp8)
        if config is None:
            return self.disable_fp8()
        if os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower() == "fp8":
            raise FP8ConfigError(
                "accelerate is configured with mixed_precision=fp8, which would convert the LM head and wrap the "
                "forward in a second autocast. Launch with --mixed_precision bf16; te-llama applies FP8 itself."
            )
        check_fp8_possible(self.te_backend, self.config)
        from te_llama.training.fp8 import te_recipe

        recipe, name = te_recipe(config), resolve_recipe_name(config)
        kept = self.model.te_settings.weights_in_fp8
        if kept is not None and not fp8_weights.same_format(kept, name):
            raise fp8_weights.FP8WeightsError(
                f"the frozen weights are kept in FP8 for the {kept} recipe, which {name!r} cannot read; call "
                "model.dequantize_weights() first, then quantize_frozen_weights() again")
        if name == "delayed" and te_patches.install("swiglu_backward"):
            from te_llama.kernels.swiglu_backward import mark_recipe

            mark_recipe(recipe, mlp_bias=self.te_family.biases(self.config).mlp)
        self.model.te_settings.fp8_recipe, self.model.te_settings.fp8_config = recipe, config
        logger.info("FP8 training with recipe %s", describe(config))
        return self

    def disable_fp8(self) -> TECausalLM:
        if self.model.te_settings.weights_in_fp8 is not None:
            raise fp8_weights.FP8WeightsError("the frozen weights are kept in FP8, which BF16 forwards would dequantize "
                                              "at every call; call model.dequantize_weights() first")
        self.model.te_settings.fp8_config, self.model.te_settings.fp8_recipe = None, None
        return self

    @property
    def fp8_config(self) -> FP8Config | None:
        """The FP8 settings in use (:meth:`enable_fp8`), or ``None`` when the model runs in BF16/FP32."""
        return self.model.te_settings.fp8_config

    @property
    def fp8_recipe_name(self) -> str | None:
        """The concrete recipe in use (``"delayed"``, ...), or ``None`` when the model runs in BF16/FP32."""
        return self.model.te_settings.fp8_recipe_name

    def fp8_active(self) -> bool:
        """Whether the next forward runs in FP8 (training mode, or eval with ``in_eval``)."""
        return self.model.te_settings.fp8_active(self.training)

    @property
    def cache_fp8_weights(self) -> bool:
        """``True``: FP8 training forwards cast the decoder weights once per weight update and reuse the cast until
        the weights change (gradient accumulation, passes without optimizer steps; see
        :mod:`te_llama.training.weight_cache`, which also says why it is off by default). ``False``: a cast every
        forward."""
        return self.model.te_settings.cache_fp8_weights

    @cache_fp8_weights.setter
    def cache_fp8_weights(self, value: bool) -> None:
        if value and is_sharded(self):
            from te_llama.training.fsdp import FSDPError

            raise FSDPError("cache_fp8_weights cannot be combined with FSDP2 (the model is sharded): the cache "
                            "follows the weights through their parameters, which FSDP replaces by shards and "
                            "gathered copies")
        if value and self.te_backend == "te":
            te_patches.install("rowwise_weight_cache")  # cached weights keep their row-wise FP8 copy alone
        self.model.te_settings.cache_fp8_weights = bool(value)

    def fp8_weights_changed(self) -> TECausalLM:
        """Cast the FP8 weights afresh at the next forward. Needed only after changing weights in ways neither an
        optimizer step nor the parameters' version counters see (writes through ``param.data``, raw pointers);
        see :mod:`te_llama.training.weight_cache`."""
        self.model.fp8_weights_changed()
        return self

    def fp8_weight_reuses(self) -> int:
        """Training forwards that reused cached FP8 weights instead of casting them."""
        cache = self.model.te_settings.weight_cache
        return 0 if cache is None else cache.reuses

    # ------------------------------------------------------------------------------------ FP8-only weights
    def quantize_frozen_weights(self, for_training: bool = True) -> TECausalLM:
        """Keep the frozen decoder weights in FP8 only (:mod:`te_llama.training.fp8_weights`).

        ``o_proj``, the MLP's gate/up and down of every layer become Transformer Engine FP8 tensors of the model's
        recipe, made once, and their high-precision parameters are freed: for the frozen base under PEFT LoRA, or a
        model that only generates. Delayed and current scaling keep one byte per weight (a backward transposes what
        it needs and drops it again); ``for_training``: a backward will run through them (LoRA), so the block and
        MXFP8 recipes quantize the column-wise copy too. Needs FP8 enabled (:meth:`enable_fp8`) and those weights
        frozen. Forwards then run in FP8 in evaluation too;
        :meth:`dequantize_weights` undoes it (the values stay their FP8 rounding)."""
        settings = self.model.te_settings
        if settings.fp8_recipe is None:
            raise fp8_weights.FP8WeightsError(
                "keeping the weights in FP8 needs FP8: call model.enable_fp8(...) first (its recipe decides how the "
                "weights are quantized)")
        if is_sharded(self):
            raise fp8_weights.FP8WeightsError("the model is sharded with FSDP2, whose all-gathers move the BF16 "
                                              "weights; keep the weights in FP8 on an unsharded model")
        if settings.cuda_graphs:
            raise fp8_weights.FP8WeightsError("CUDA graphs are enabled and would replay on the BF16 weights they "
                                              "recorded; call model.disable_cuda_graphs() first")
        self.disable_decode_graphs()  # recorded on the BF16 weights
        count = fp8_weights.quantize(self.model.layers, settings.fp8_recipe, for_training)
        settings.weights_in_fp8, settings.weight_cache = settings.fp8_recipe_name, None
        logger.info("kept %d frozen decoder weights in FP8 only (%s)", count, settings.fp8_recipe_name)
        return self

    def dequantize_weights(self) -> TECausalLM:
        """Undo :meth:`quantize_frozen_weights`: the FP8 weights become frozen parameters of the model's dtype again,
        holding their FP8 values."""
        settings = self.model.te_settings
        if settings.weights_in_fp8 is not None:
            self.disable_decode_graphs()
            fp8_weights.dequantize(self.model.layers, self.model.embed_tokens.weight.dtype)
            settings.weights_in_fp8, settings.weight_cache = None, None
        return self

    @property
    def weights_in_fp8(self) -> str | None:
        """The recipe the frozen decoder weights are kept in FP8 for (:meth:`quantize_frozen_weights`), else
        ``None``."""
        return self.model.te_settings.weights_in_fp8

    def forward(self, *args, **kwargs):
        # FP8, CUDA graphs and the weight cache apply in the decoder stack's forward (TEDecoderStack), whoever
        # calls it.
        if self._chunked_loss_applies(args, kwargs):
            return self._forward_chunked_loss(**kwargs)
        return super().forward(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """HF's ``generate()``. In FP8 (``FP8Config(in_eval=True)``) the decoder layers' weights are cast to FP8 once
        per call instead of at every step (:meth:`TEDecoderStack.generation_call`)."""
        with self.model.generation_call():
            return super().generate(*args, **kwargs)

    # ------------------------------------------------------------------------------------------ CUDA graphs
    def enable_cuda_graphs(self) -> TECausalLM:
        """Replay the decoder layers as CUDA graphs in training steps of one fixed batch shape.

        The graphs are recorded at the next training forward without padding (a few eager steps' time), for
        that batch's shape, and again only when the FP8 recipe changes. Forwards they cannot serve (evaluation,
        padded batches, other shapes such as an epoch's short last batch, gradient accumulation after the first
        micro-batch) run eagerly as before; see :mod:`te_llama.training.cuda_graphs`. Calling this again records anew at the
        next training forward. Gradient checkpointing cannot be combined with them.

        Under DDP (several processes), every process calls it after ``torch.distributed.init_process_group()`` and
        before wrapping the model in ``DistributedDataParallel``: it makes the decoder parameters' gradient
        accumulators on a side stream, which recording the graphs needs, and a gloo group with which the processes
        agree on every training forward whether to replay (see :class:`te_llama.training.cuda_graphs.GraphPeers`).
        """
        if self.weights_in_fp8 is not None:
            raise CudaGraphError("CUDA graphs do not record weights kept in FP8 (quantize_frozen_weights) yet; call "
                                 "model.dequantize_weights() first")
        if is_sharded(self):
            raise CudaGraphError("CUDA graphs cannot be combined with FSDP2 (the model is sharded): FSDP gathers the "
                                 "weights into new memory every step, which recorded graphs cannot follow; train "
                                 "with DDP to use them")
        if self.te_backend != "te":
            raise CudaGraphError("CUDA graphs need the Transformer Engine backend on a CUDA GPU; this model runs "
                                 f"the {self.te_backend!r} layer (set TE_LLAMA_BACKEND=te on a GPU machine)")
        if self.is_gradient_checkpointing:
            raise CudaGraphError("gradient checkpointing is on: it recomputes the forward during the backward "
                                 "pass, which a recorded graph cannot; turn one of them off")
        release_layer_graphs(self.model.layers)
        settings = self.model.te_settings
        if several_processes() and settings.graph_peers.group is None:
            settings.graph_peers = GraphPeers.start(self.model.layers.parameters())
        settings.cuda_graphs = True
        return self

    def disable_cuda_graphs(self) -> TECausalLM:
        """Run the decoder layers eagerly again and free the graphs' memory."""
        release_layer_graphs(self.model.layers)
        self.model.te_settings.cuda_graphs = False
        return self

    @property
    def cuda_graphs(self) -> bool:
        """Whether training steps replay the decoder layers as CUDA graphs (:meth:`enable_cuda_graphs`)."""
        return self.model.te_settings.cuda_graphs

    def cuda_graph_replays(self) -> int:
        """How many forwards of the first decoder layer replayed its graph since the graphs were last recorded."""
        graph = self.model.layers[0].cuda_graph
        return 0 if graph is None else graph.replays_done

    # ---------------------------------------------------------------------------------- decode CUDA graphs
    def enable_decode_graphs(self, capture: bool = True) -> TECausalLM:
        """Replay ``generate()``'s decode steps on HF's static cache as CUDA graphs.

        Applies where ``generate()`` runs on a ``StaticCache`` (``cache_implementation="static"``, or one passed as
        ``past_key_values``) on a CUDA device, without gradients: the decoder layers of each step with one new
        token per row are recorded at the first such step of every (batch size, cache length, dtype) and replayed
        afterwards. The prompt's forward, other caches and the cases in :mod:`te_llama.generation.decode_graphs`
        run eagerly, the log saying why once. Each recorded step keeps a static cache's keys and values until
        :meth:`disable_decode_graphs`.

        ``capture=False`` records no graph and runs each step's function on its buffers eagerly: the same buffer
        handling on any device, for tests and the CPU path of ``te-llama bench --generation``."""
        if is_sharded(self):
            raise CudaGraphError("decode graphs cannot be combined with FSDP2 (the model is sharded): FSDP gathers "
                                 "the weights into new memory at every forward, which a recorded graph cannot follow")
        self.disable_decode_graphs()
        self.model.te_settings.decode_graphs = DecodeGraphs(self.model.layers, capture)
        return self

    def disable_decode_graphs(self) -> TECausalLM:
        """Run the decode steps eagerly again and free the recorded steps' memory."""
        settings = self.model.te_settings
        if settings.decode_graphs is not None:
            settings.decode_graphs.release()
        settings.decode_graphs = None
        return self

    def decode_graph_replays(self) -> int:
        """How many decode steps ran as a recorded step since :meth:`enable_decode_graphs`."""
        decode_graphs = self.model.te_settings.decode_graphs
        return 0 if decode_graphs is None else decode_graphs.replays

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        # generate() compiles the forward by itself for a static cache on CUDA. te-llama's decoder stack is not
        # written for dynamo (TE's modules break its graphs; the stack reads batch layouts on the host), and its own
        # fast path for that cache is decode graphs, which dynamo would trace through instead of replaying: so only
        # a caller's explicit compile_config, without decode graphs, compiles.
        if self.model.te_settings.decode_graphs is not None:
            return False
        if generation_config.compile_config is None:
            if super()._valid_auto_compile_criteria(model_kwargs, generation_config):
                _say_once("te-llama does not let generate() compile its forward for the static cache; "
                          "model.enable_decode_graphs() records the decode step as a CUDA graph (a compile_config "
                          "in the generation config compiles anyway)")
            return False
        return super()._valid_auto_compile_criteria(model_kwargs, generation_config)

    def _chunked_loss_applies(self, args: tuple, kwargs: dict) -> bool:
        # Training with labels, where nobody reads the logits: the Trainer's and a plain loop's training step.
        return (self.chunked_lm_head_loss and self.training and torch.is_grad_enabled() and not args
                and kwargs.get("labels") is not None and not kwargs.get("logits_to_keep")
                and kwargs.get("return_dict") is not False
                and type(self.lm_head) is torch.nn.Linear and self.lm_head.bias is None  # not wrapped (LoRA, ...)
                and getattr(self.config, "loss_type", None) in (None, "ForCausalLM"))

    def _forward_chunked_loss(self, labels: torch.Tensor, logits_to_keep=0, **kwargs) -> CausalLMOutputWithPast:
        """HF's forward with the LM head and loss fused in chunks: ``loss`` is set, ``logits`` is ``None``."""
        outputs = self.model(**kwargs)
        loss = linear_cross_entropy(
            outputs.last_hidden_state, self.lm_head.weight, labels, shift_labels=kwargs.get("shift_labels"),
            num_items_in_batch=kwargs.get("num_items_in_batch"), ignore_index=kwargs.get("ignore_index", -100))
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs):
        # TE layers recompute under TE's checkpoint, which restores the FP8 autocast state and recipe for the
        # recomputation; torch's checkpoint would recompute them outside FP8.
        if gradient_checkpointing_func is None:
            from torch.utils.checkpoint import checkpoint as gradient_checkpointing_func
        if enable and self.te_backend == "te":
            import transformer_engine.pytorch as te

            use_reentrant = getattr(gradient_checkpointing_func, "keywords", {}).get("use_reentrant", False)
            gradient_checkpointing_func = functools.partial(te.distributed.checkpoint, use_reentrant=use_reentrant)
        return super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, **kwargs)

    # ------------------------------------------------------------------------------------------------- saving
    def hf_config(self) -> PretrainedConfig:
        """The config a plain HF model of the family (``LlamaForCausalLM``, ...) should be saved with."""
        config = copy.deepcopy(self.config)
        config.architectures = [self.te_family.name + "ForCausalLM"]
        config.use_cache = self._hf_use_cache
        config.dtype = self.dtype
        return config

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None,
                        max_shard_size: int | str = "5GB", is_main_process: bool = True, **kwargs) -> None:
        """Write a standard HF checkpoint of the family (``LlamaForCausalLM``, ..., HF names, no FP8 state),
        atomically.

        On a model sharded with FSDP2 every process must call it: the full weights are gathered to the first
        process, which writes the checkpoint; the others write nothing."""
        if kwargs.get("push_to_hub"):
            raise NotImplementedError("te-llama saves locally; push the saved directory with huggingface_hub")
        if state_dict is None and is_sharded(self):
            from te_llama.training.fsdp import gathered_state_dict

            state_dict = gathered_state_dict(self)  # in every process: it all-gathers
            is_main_process = is_main_process and dist.get_rank() == 0
        if not is_main_process:
            return
        if state_dict is None and has_adapters(self.model.layers):
            raise CheckpointError(
                f"{save_directory}: the model carries PEFT adapters; save them with the PeftModel's "
                "save_pretrained (a standard adapter directory), or merge them first with merge_and_unload()")
        state = state_dict if state_dict is not None else self.state_dict()
        dtype = self.model.embed_tokens.weight.dtype
        state = {key: fp8_weights.high_precision(tensor, dtype) for key, tensor in state.items()}  # weights in FP8
        tensors = te_to_hf(state, tie_word_embeddings=bool(self.config.tie_word_embeddings),
                           table=self.te_family.weights)
        generation_config = copy.deepcopy(self.generation_config)
        generation_config.use_cache = self._hf_use_cache
        write_checkpoint(save_directory, tensors, self.hf_config(), generation_config, max_shard_size)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accepts te-llama names and also the family's HF names (a Trainer checkpoint, one shard of one), copying
        HF tensors into TE's parameters the way :meth:`from_pretrained` does."""
        if self.weights_in_fp8 is not None:
            raise fp8_weights.FP8WeightsError("the frozen weights are kept in FP8, which loading cannot write into "
                                              "part by part; call model.dequantize_weights() first")
        table = self.te_family.weights
        hf_keys = {key for key in state_dict if _is_hf_name(key, table)}
        if not hf_keys:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        params = dict(self.named_parameters())
        tied = bool(self.config.tie_word_embeddings)
        with torch.no_grad():
            for key in hf_keys:
                copy_hf_tensor(params, key, state_dict[key], tied, table)
        rest = {k: v for k, v in state_dict.items() if k not in hf_keys}
        result = super().load_state_dict(rest, strict=False, assign=assign)
        covered = hf_keys | set(rest)
        missing = [key for key in params if not all(name in covered or (tied and name == "lm_head.weight")
                                                      for name in hf_names(key, table))]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"state dict does not match: missing {missing}, unexpected {result.unexpected_keys}")
        return type(result)(missing, result.unexpected_keys)


def _is_hf_name(key: str, table) -> bool:
    try:
        target = hf_target(key, table)
    except KeyError:
        return False
    return target is not None and target[0] != key


def _forward_of(hf_causal_lm: type):
    """:meth:`TECausalLM.forward` under ``hf_causal_lm.forward``'s name, signature and docstring: the Trainer and PEFT
    read the signature to know which batch columns the model takes."""

    @functools.wraps(hf_causal_lm.forward)
    def forward(self, *args, **kwargs):
        return TECausalLM.forward(self, *args, **kwargs)

    return forward


class TELlamaForCausalLM(TECausalLM, LlamaForCausalLM):
    """A ``LlamaForCausalLM`` with Transformer Engine decoder layers (or the reference layer on CPU)."""

    te_family = LLAMA
    forward = _forward_of(LlamaForCausalLM)


class TEMistralForCausalLM(TECausalLM, MistralForCausalLM):
    """A ``MistralForCausalLM`` with Transformer Engine decoder layers (sliding window: TE's ``window_size``)."""

    te_family = MISTRAL
    forward = _forward_of(MistralForCausalLM)


class TEQwen2ForCausalLM(TECausalLM, Qwen2ForCausalLM):
    """A ``Qwen2ForCausalLM`` (Qwen2, Qwen2.5) with Transformer Engine decoder layers (q/k/v biases)."""

    te_family = QWEN2
    forward = _forward_of(Qwen2ForCausalLM)


class TEQwen3ForCausalLM(TECausalLM, Qwen3ForCausalLM):
    """A ``Qwen3ForCausalLM`` with Transformer Engine decoder layers (per-head q/k RMSNorm: TE's ``qk_norm_type``)."""

    te_family = QWEN3
    forward = _forward_of(Qwen3ForCausalLM)

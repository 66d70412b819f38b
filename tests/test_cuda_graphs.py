"""CUDA graphs on a CPU machine: refused with a clear error; the eager layer is unchanged (the graphs
themselves run in tests/gpu/test_cuda_graphs.py)."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from te_llama import TELlamaForCausalLM
from te_llama.bench.suite import VARIANTS, skip_reason
from te_llama.bench.variants import Variant, is_variant
from te_llama.training.cuda_graphs import CudaGraphError

CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)


def test_reference_backend_refuses_cuda_graphs():
    model = TELlamaForCausalLM.from_config(CONFIG, backend="reference")
    with pytest.raises(CudaGraphError, match="Transformer Engine backend on a CUDA GPU"):
        model.enable_cuda_graphs()
    assert not model.cuda_graphs and model.cuda_graph_replays() == 0


def test_a_capture_failing_under_ddp_becomes_advice(monkeypatch):
    import te_llama.training.distributed
    from te_llama.training.cuda_graphs import _explain_capture_failure_under_ddp

    def failed_capture():  # how torch reports it: ending the capture fails, the cause is its context
        try:
            raise RuntimeError("CUDA error: operation would make the legacy stream depend on a capturing blocking "
                               "stream")
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(te_llama.training.distributed, "several_processes", lambda: True)  # as under torchrun
    with pytest.raises(CudaGraphError, match="before wrapping the model in DistributedDataParallel"):
        with _explain_capture_failure_under_ddp():
            failed_capture()
    with pytest.raises(RuntimeError, match="out of memory"):  # other errors pass through unchanged
        with _explain_capture_failure_under_ddp():
            raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(te_llama.training.distributed, "several_processes", lambda: False)
    with pytest.raises(RuntimeError, match="previous error during capture"):  # one process: no DDP to blame
        with _explain_capture_failure_under_ddp():
            failed_capture()


def test_what_ddp_graphs_keep_is_not_copied_with_the_model():
    import copy

    from te_llama.training.cuda_graphs import GraphPeers

    model = TELlamaForCausalLM.from_config(CONFIG, backend="reference")
    nodes = [torch.autograd.graph.get_gradient_edge(p).node for p in model.model.layers.parameters()]
    group = object()  # a process group, which cannot be copied either
    model.model.te_settings.graph_peers = GraphPeers(nodes, group)
    copied = copy.deepcopy(model)  # autograd nodes cannot be copied; a copy has its own parameters anyway
    peers, copied_peers = model.model.te_settings.graph_peers, copied.model.te_settings.graph_peers
    assert copied_peers.accumulators == () and copied_peers.group is None
    assert len(peers.accumulators) == len(nodes) and peers.group is group


def test_layers_without_graphs_train_as_before():
    model = TELlamaForCausalLM.from_config(CONFIG, backend="reference").train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.cuda_graph is None for layer in model.model.layers)
    assert all(p.grad is not None for p in model.parameters())


def test_graph_variants_in_the_benchmark():
    assert "te_fp8_delayed_graphs" in VARIANTS
    assert Variant.parse("te_fp8_delayed_graphs").recipe == "delayed" and Variant.parse("te_bf16").recipe is None
    assert is_variant("te_bf16_graphs") and not is_variant("hf_bf16_graphs")
    if not torch.cuda.is_available():
        assert skip_reason("te_fp8_delayed_graphs") == "needs a CUDA GPU"


def test_graphs_are_recorded_once_per_recipe_and_never_for_padded_batches(monkeypatch, caplog):
    """The recording decision, with the recording itself (TE on a GPU) replaced by a stand-in."""
    import te_llama.training.cuda_graphs as cuda_graphs

    model = TELlamaForCausalLM.from_config(CONFIG, backend="reference")
    recorded = []

    def record(layers, rotary_emb, batch, seq, hidden, dtype, recipe, cache_weights=False, group=None, packing=None):
        recorded.append(((batch, seq), recipe) + ((True,) if cache_weights else ()))
        return cuda_graphs.StackGraph((cuda_graphs._StackCall(layers),), torch.Size((batch, seq, hidden)), dtype,
                                      recipe, cache_weights)

    monkeypatch.setattr(cuda_graphs, "record_layer_graphs", record)
    monkeypatch.setattr(cuda_graphs.StackGraph, "reset", lambda self: None)
    shape, short = torch.Size((4, 32)), torch.Size((1, 32))
    padded = torch.ones(4, 32, dtype=torch.long)
    padded[0, -3:] = 0
    cuda_graphs.record_layer_graphs_once(model.model, shape, padded, None)
    assert recorded == [] and model.model.layers[0].cuda_graph is None  # a padded batch records nothing
    cuda_graphs.record_layer_graphs_once(model.model, shape, torch.ones(4, 32, dtype=torch.long), None)
    with caplog.at_level("INFO", logger="te_llama"):
        for _ in range(3):
            cuda_graphs.record_layer_graphs_once(model.model, short, None, None)  # an epoch's short last batch
            cuda_graphs.record_layer_graphs_once(model.model, shape, None, None)
    assert recorded == [((4, 32), None)]
    assert sum("run eagerly" in record.message for record in caplog.records) == 1
    recipe = object()  # another FP8 recipe: recorded again for it
    cuda_graphs.record_layer_graphs_once(model.model, shape, None, recipe)
    assert recorded == [((4, 32), None), ((4, 32), recipe)]
    assert all(layer.cuda_graph is model.model.layers[0].cuda_graph for layer in model.model.layers)
    assert model.model.layers[0].cuda_graph.recipe is recipe
    cuda_graphs.record_layer_graphs_once(model.model, shape, None, recipe, cache_weights=True)  # FP8 weight cache
    cuda_graphs.record_layer_graphs_once(model.model, shape, None, recipe, cache_weights=True)
    assert recorded[2:] == [((4, 32), recipe, True)] and model.model.layers[0].cuda_graph.caches_weights
    cuda_graphs.release_layer_graphs(model.model.layers)
    assert all(layer.cuda_graph is None for layer in model.model.layers)


def test_a_training_forward_that_cannot_replay_says_why_once(caplog):
    """The replay conditions checked before TE's FP8 state (which needs TE): each reason for an eager training
    forward is logged once; evaluation and other batch shapes are expected and not logged."""
    import te_llama.training.cuda_graphs as cuda_graphs

    model = TELlamaForCausalLM.from_config(CONFIG, backend="reference").train()
    shape = torch.Size((2, 16, 64))
    graph = cuda_graphs.StackGraph(cuda_graphs.split_stack(model.model.layers), shape, torch.float32, None)
    graph.armed = True
    hidden = torch.zeros(shape)
    with caplog.at_level("INFO", logger="te_llama"):
        assert "padding" in graph.eager_reason(hidden, "padding_causal")
        assert "bfloat16" in graph.eager_reason(hidden.bfloat16(), "causal")
        first = next(iter(graph.params))
        first.grad = torch.zeros_like(first)
        for _ in range(3):
            assert not graph.replays(hidden, "causal")
        assert "gradient accumulation" in graph.eager_reason(hidden, "causal")
        assert graph.eager_reason(torch.zeros(1, 16, 64), "causal") == ""  # another shape: reported when recorded
        model.eval()
        assert graph.eager_reason(hidden, "causal") == ""  # evaluation runs eagerly by design
        assert not graph.replays(hidden, "causal")
    eager = [r.message for r in caplog.records if "runs its decoder layers eagerly" in r.message]
    assert len(eager) == 1 and "already hold gradients" in eager[0]


def test_the_first_layer_runs_the_stack_and_the_others_hand_its_output_on(monkeypatch):
    """The dispatch of a replay, with the recorded stack replaced by the same layers run eagerly (no TE here):
    every layer computes exactly once, and the model's output is the eager one; a forward that asks for hidden
    states runs layer by layer."""
    import te_llama.training.cuda_graphs as cuda_graphs

    config = LlamaConfig(**{**CONFIG.to_dict(), "num_hidden_layers": 3})
    model = TELlamaForCausalLM.from_config(config, backend="reference").train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids, labels=ids).loss
    layers = model.model.layers
    parts = cuda_graphs.split_stack(layers)  # recorded as two graphs: the first layer, then the others
    assert [[layer.layer_idx for layer in part.layers] for part in parts] == [[0], [1, 2]]
    assert [len(part.layers) for part in cuda_graphs.split_stack(layers[:1])] == [1]
    eight = [torch.nn.Linear(1, 1) for _ in range(8)]  # under DDP the others in DDP_PARTS graphs
    assert [[eight.index(layer) for layer in part.layers] for part in cuda_graphs.split_stack(eight, ddp=True)] \
        == [[0], [1, 2], [3, 4], [5, 6], [7]]
    graph = cuda_graphs.StackGraph(parts, torch.Size((2, 16, 64)), torch.float32, None)
    monkeypatch.setattr(cuda_graphs.StackGraph, "replays", lambda self, hidden, mask_type: self.armed)
    monkeypatch.setattr(cuda_graphs, "record_layer_graphs_once", lambda *args, **kwargs: None)  # "recorded" above
    model.model.te_settings.cuda_graphs = True
    calls = []
    for layer in layers:
        monkeypatch.setattr(layer, "te_forward", lambda *a, _f=layer.te_forward, _i=layer.layer_idx, **k:
                            calls.append(_i) or _f(*a, **k))
        layer.cuda_graph = graph
    loss = model(input_ids=ids, labels=ids).loss
    assert graph.replays_done == 1 and calls == [0, 1, 2] and not graph.armed
    torch.testing.assert_close(loss, expected)
    calls.clear()
    outputs = model(input_ids=ids, labels=ids, output_hidden_states=True)
    assert graph.replays_done == 1 and calls == [0, 1, 2]  # eager: each layer's own output is reported
    torch.testing.assert_close(outputs.loss, expected)
    assert len({h.data_ptr() for h in outputs.hidden_states}) == len(outputs.hidden_states) == len(layers) + 1


def _packed_batch(seed: int = 0, rows: int = 2, seq: int = 16):
    """Rows of packed documents, every token real: ids, position ids restarting at each document, and the stream."""
    from te_llama.model.packed import packed_sequences

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (rows, seq), generator=generator)
    positions = torch.cat([torch.cat([torch.arange(n) for n in lengths]) for lengths in ([5, 7, 4], [9, 7])
                           ][:rows])[None].reshape(rows, seq)
    return ids, positions, packed_sequences(ids, None, positions)


def test_packed_batches_at_a_fixed_budget_record_a_packed_graph(monkeypatch, caplog):
    """The recording decision for packed batches, the recording replaced by a stand-in: a batch whose every token is
    real records a graph for packed batches with room for twice its documents (at least 64); one with padding
    records nothing; later batches say why they run eagerly."""
    import te_llama.training.cuda_graphs as cuda_graphs
    from te_llama.model.masks import causal_marker
    from te_llama.model.packed import packed_sequences

    model = TELlamaForCausalLM.from_config(CONFIG, backend="reference").train()
    recorded = []

    def record(layers, rotary_emb, batch, seq, hidden, dtype, recipe, cache_weights=False, group=None, packing=None):
        recorded.append(packing)
        return cuda_graphs.StackGraph(cuda_graphs.split_stack(layers, packing=packing),
                                      torch.Size((batch, seq, hidden)), dtype, recipe, cache_weights, group, packing)

    monkeypatch.setattr(cuda_graphs, "record_layer_graphs", record)
    ids, positions, packed = _packed_batch()
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with_padding = packed_sequences(ids, mask, positions)
    cuda_graphs.record_layer_graphs_once(model.model, ids.shape, causal_marker(2, 16), None, packed=with_padding)
    assert recorded == []
    cuda_graphs.record_layer_graphs_once(model.model, ids.shape, causal_marker(2, 16), None, packed=packed)
    assert recorded == [cuda_graphs.Packing(capacity=64, max_seqlen=16)]
    graph = model.model.layers[0].cuda_graph
    assert isinstance(graph.calls[0], cuda_graphs._PackedStackCall)
    graph.armed = True
    hidden = torch.zeros(2, 16, 64)
    assert "padding" in graph.eager_reason(hidden, "padding_causal", with_padding)
    assert "recorded for packed documents" in graph.eager_reason(hidden, "causal")  # whole rows
    many = packed_sequences(torch.zeros(2, 80), None, torch.zeros(2, 80, dtype=torch.long))  # 160 one-token documents
    assert "160 sequences; the CUDA graphs take up to 64" in cuda_graphs.Packing(64, 80).eager_reason(many)
    assert cuda_graphs.Packing.for_batch(many) == cuda_graphs.Packing(capacity=320, max_seqlen=80)


def test_a_packed_replay_runs_what_the_graph_records(monkeypatch):
    """The function a graph of packed batches records (the layers on the stream with ``cu_seqlens`` padded by empty
    sequences and RoPE from the per-token table), run eagerly in the graph's place on the reference layer: the loss
    and gradients of the eager packed forward, each layer computed once."""
    import te_llama.training.cuda_graphs as cuda_graphs

    config = LlamaConfig(**{**CONFIG.to_dict(), "num_hidden_layers": 3})
    model = TELlamaForCausalLM.from_config(config, backend="reference").train()
    ids, positions, packed = _packed_batch(seed=1)
    expected = model(input_ids=ids, position_ids=positions, labels=ids).loss
    expected.backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    packing = cuda_graphs.Packing(capacity=8, max_seqlen=16)
    graph = cuda_graphs.StackGraph(cuda_graphs.split_stack(model.model.layers, packing=packing),
                                   torch.Size((2, 16, 64)), torch.float32, None, packing=packing)
    monkeypatch.setattr(cuda_graphs.StackGraph, "replays", lambda self, hidden, mask_type, packed=None: self.armed)
    monkeypatch.setattr(cuda_graphs, "record_layer_graphs_once", lambda *args, **kwargs: None)  # "recorded" above
    seen = []
    monkeypatch.setattr(cuda_graphs._PackedStackCall, "__call__",
                        lambda self, *a, **k: seen.append(k["cu_seqlens"].tolist()) or self.forward(*a, **k))
    model.model.te_settings.cuda_graphs = True
    for layer in model.model.layers:
        layer.cuda_graph = graph
    loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
    loss.backward()
    assert graph.replays_done == 1 and seen == [[0, 5, 12, 16, 25, 32, 32, 32, 32]] * 2  # two parts, one replay
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_every_training_forward_reaches_the_replay_decision_padded_or_packed(monkeypatch):
    """Under DDP the processes vote on every training forward (test_processes_agree_on_recording_and_replaying):
    a padded or packed batch, which runs as a padding-free stream, asks the graph too, so a process with one never
    leaves the others waiting for its vote."""
    import te_llama.training.cuda_graphs as cuda_graphs

    model = TELlamaForCausalLM.from_config(CONFIG, backend="reference").train()
    graph = cuda_graphs.StackGraph(cuda_graphs.split_stack(model.model.layers), torch.Size((2, 16, 64)),
                                   torch.float32, None)
    asked = []
    monkeypatch.setattr(cuda_graphs.StackGraph, "replays",
                        lambda self, hidden, mask_type, packed=None: asked.append(packed is not None) and False)
    monkeypatch.setattr(cuda_graphs, "record_layer_graphs_once", lambda *args, **kwargs: None)
    model.model.te_settings.cuda_graphs = True
    for layer in model.model.layers:
        layer.cuda_graph = graph
    ids, positions, _ = _packed_batch()
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()  # padded
    model(input_ids=ids, position_ids=positions, labels=ids).loss.backward()  # packed documents
    model(input_ids=ids, labels=ids).loss.backward()  # whole rows
    assert asked == [True, True, False]  # once per forward, by the first layer


def _vote(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: process 1's batch is padded, process 0's is not."""
    import json
    import logging

    import torch.distributed as dist

    import te_llama.training.cuda_graphs as cuda_graphs
    from te_llama.training.distributed import host_group

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("te_llama").addHandler(handler)
    logging.getLogger("te_llama").setLevel(logging.INFO)
    model = TELlamaForCausalLM.from_config(CONFIG, backend="reference").train()
    group = host_group()
    recorded = []

    def record(layers, rotary_emb, batch, seq, hidden, dtype, recipe, cache_weights=False, group=None, packing=None):
        recorded.append(group is not None)
        return cuda_graphs.StackGraph(cuda_graphs.split_stack(layers), torch.Size((batch, seq, hidden)), dtype,
                                      recipe, cache_weights, group)

    cuda_graphs.record_layer_graphs = record  # the recording itself needs TE on a GPU
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, -2:] = 1 - rank  # padding in process 1 only
    cuda_graphs.record_layer_graphs_once(model.model, torch.Size((2, 16)), mask, None, group=group)
    graph = model.model.layers[0].cuda_graph
    # TE's FP8 state, which the replay conditions read last: BF16, as recorded
    import sys
    import types

    state = types.SimpleNamespace(FP8GlobalStateManager=types.SimpleNamespace(is_fp8_enabled=lambda: False))
    sys.modules["transformer_engine.pytorch.quantization"] = state
    graph.armed = True
    hidden = torch.zeros(2, 16, 64)
    votes = [graph.replays(hidden, "padding_causal" if rank else "causal") for _ in range(2)]
    votes.append(graph.replays(hidden, "causal"))  # a batch without padding everywhere: both replay
    if rank == 0:  # evaluation in one process alone (a sample, a metric) never waits for the other
        model.eval()
        votes.append(graph.replays(hidden, "causal"))
    # A training forward in process 0 alone: its vote times out (here after 2 s) with advice
    import datetime

    alone = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=2))
    graph.group = alone
    model.train()
    error = ""
    if rank == 0:
        try:
            graph.replays(hidden, "causal")
        except cuda_graphs.CudaGraphError as raised:
            error = str(raised)
    Path(out, f"{rank}.json").write_text(json.dumps({"recorded": recorded, "votes": votes, "log": messages,
                                                     "error": error}))
    dist.barrier(group)
    dist.destroy_process_group()


def test_processes_agree_on_recording_and_replaying(tmp_path):
    """Under DDP, a process whose batch has padding runs its layers eagerly, and so must every other: replayed and
    eager layers make different collectives (seen as a hang on two H200s). Two gloo processes on the CPU."""
    import json
    import socket

    import torch.multiprocessing

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    torch.multiprocessing.spawn(_vote, args=(port, str(tmp_path)), nprocs=2, join=True)
    first, second = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1))
    assert first["recorded"] == second["recorded"] == [True]  # both record, though process 1's batch was padded
    assert first["votes"] == [False, False, True, False] and second["votes"] == [False, False, True]
    eager = [m for m in first["log"] if "eagerly" in m]
    assert len(eager) == 1 and "another process runs this forward's layers eagerly" in eager[0]  # said once
    eager = [m for m in second["log"] if "eagerly" in m]
    assert len(eager) == 1 and "the batch has padding" in eager[0]
    assert "every process must make each training forward" in first["error"] and second["error"] == ""

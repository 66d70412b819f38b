"""CUDA graphs of the decoder layers: the same numbers as eager steps, and eager where a graph cannot serve."""

import pytest
import torch
from small_llama import batch, model, rel, train

pytestmark = pytest.mark.gpu


def replays(m):
    return [layer.cuda_graph.replays_done if layer.cuda_graph is not None else 0 for layer in m.model.layers]


@pytest.mark.parametrize("fp8", [None, "delayed", "current"])
def test_graphed_training_matches_eager(fp8, record):
    eager, graphed = model(fp8), model(fp8, graphs=True)
    losses_eager, losses_graphed = train(eager, 6), train(graphed, 6)
    assert replays(graphed) == [6, 6]  # recorded at the first step, replayed in every step
    weights = {k: rel(p, dict(eager.named_parameters())[k]) for k, p in graphed.named_parameters()}
    worst = max(weights, key=weights.get)
    record(test="cuda_graphs_vs_eager", fp8=fp8, losses_eager=losses_eager, losses_graphed=losses_graphed,
           worst_weight=worst, worst_weight_rel_diff=weights[worst])
    assert max(abs(a - b) / a for a, b in zip(losses_eager, losses_graphed)) < 2e-3
    assert weights[worst] < 2e-3
    if fp8 == "delayed":  # the scales the graphs read were updated between replays like the eager ones
        history = [m.model.layers[1].layernorm_mlp.fp8_meta["scaling_fwd"].amax_history for m in (eager, graphed)]
        assert history[1].abs().sum() > 0 and rel(history[1], history[0]) < 2e-2


def packed_blocks(step: int, rows: int = 4, seq: int = 256):
    """A fixed budget of packed documents, as ``te-llama finetune`` makes them: ``rows`` x ``seq`` tokens, every one
    real, position ids restarting at documents of random lengths (another split each step)."""
    generator = torch.Generator().manual_seed(step)
    positions = []
    for _ in range(rows):
        row, left = [], seq
        while left:
            n = min(left, int(torch.randint(8, 120, (), generator=generator)))
            row.append(torch.arange(n))
            left -= n
        positions.append(torch.cat(row))
    ids = torch.randint(0, 1024, (rows, seq), generator=generator)
    return {"input_ids": ids.cuda(), "position_ids": torch.stack(positions).cuda(), "labels": ids.cuda()}


@pytest.mark.parametrize("fp8", [None, "delayed"])
def test_packed_blocks_at_a_fixed_budget_replay_and_match_eager(fp8, record):
    eager, graphed = model(fp8), model(fp8, graphs=True)
    results = {}
    for name, m in (("eager", eager), ("graphed", graphed)):
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3)
        losses = []
        for step in range(6):
            loss = m(**packed_blocks(step)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        results[name] = losses
    graph = graphed.model.layers[0].cuda_graph
    record(test="cuda_graphs_packed_vs_eager", fp8=fp8, losses_eager=results["eager"],
           losses_graphed=results["graphed"], capacity=graph.packing.capacity)
    assert graph.packing is not None and replays(graphed) == [6, 6]  # another split into documents every step
    assert max(abs(a - b) / a for a, b in zip(results["eager"], results["graphed"])) < 2e-3


def test_gradient_accumulation_after_the_first_micro_batch_runs_eagerly(record):
    eager, graphed = model("delayed"), model("delayed", graphs=True)
    losses_eager, losses_graphed = train(eager, 3, micro_batches=2), train(graphed, 3, micro_batches=2)
    assert replays(graphed) == [3, 3]  # the first micro-batch of each step
    record(test="cuda_graphs_accumulation", losses_eager=losses_eager, losses_graphed=losses_graphed)
    assert max(abs(a - b) / a for a, b in zip(losses_eager, losses_graphed)) < 2e-3


def test_padded_batches_other_shapes_and_eval_run_eagerly():
    m = model("delayed", graphs=True)
    train(m, 1)
    x = batch(7)
    mask = torch.ones_like(x)
    mask[:, -16:] = 0
    m(input_ids=x, labels=x, attention_mask=mask).loss.backward()
    m.zero_grad(set_to_none=True)
    y = batch(8, size=2)
    m(input_ids=y, labels=y).loss.backward()  # another shape (an epoch's short last batch): eager, not recorded
    m.zero_grad(set_to_none=True)
    assert m.model.layers[0].cuda_graph.shape[:2] == x.shape
    m.eval()
    with torch.no_grad():
        logits = m(input_ids=y).logits
    assert torch.isfinite(logits).all()
    assert replays(m) == [1, 1]
    m.train()
    m(input_ids=x, labels=x).loss.backward()  # the recorded shape replays again
    assert replays(m) == [2, 2]
    m.enable_cuda_graphs()  # asked again: records for the next training batch
    m.zero_grad(set_to_none=True)
    m(input_ids=y, labels=y).loss.backward()
    assert m.model.layers[0].cuda_graph.shape[:2] == y.shape and replays(m) == [1, 1]


def test_graphs_refuse_gradient_checkpointing():
    from te_llama.training.cuda_graphs import CudaGraphError

    m = model()
    m.gradient_checkpointing_enable()
    with pytest.raises(CudaGraphError, match="gradient checkpointing"):
        m.enable_cuda_graphs()


def test_trainer_steps_replay_the_graphs(tmp_path, record):
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": ids, "labels": ids} for ids in batch(3, size=16).cpu()]

    def run(graphs):
        m = model("delayed", graphs=graphs)
        args = TrainingArguments(output_dir=str(tmp_path / str(graphs)), max_steps=4, per_device_train_batch_size=4,
                                 learning_rate=1e-3, bf16=True, report_to=[], save_strategy="no", logging_steps=1,
                                 optim="adamw_torch_fused", dataloader_num_workers=0, seed=0, data_seed=0)
        trainer = Trainer(model=m, args=args, train_dataset=rows)
        trainer.train()
        return m, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    (_, eager), (graphed_model, graphed) = run(False), run(True)
    record(test="cuda_graphs_trainer", losses_eager=eager, losses_graphed=graphed,
           replays=graphed_model.cuda_graph_replays())
    assert graphed_model.cuda_graph_replays() == 4  # recorded under the Trainer's bf16 autocast, replayed each step
    assert len(graphed) == 4 and max(abs(a - b) / a for a, b in zip(eager, graphed)) < 2e-3

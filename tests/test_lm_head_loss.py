"""The chunked LM head + cross-entropy against HF's full-logits loss: same loss, same gradients."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from conftest import relative_error, run_interpreted, tiny_config
from te_llama import TELlamaForCausalLM
from te_llama.model.lm_head_loss import chunk_tokens, linear_cross_entropy


def hf_loss(hidden, weight, labels, **kwargs):
    return ForCausalLMLoss(hidden @ weight.t(), labels, weight.shape[0], **kwargs)


def make_inputs(dtype=torch.float32, vocab=300, hidden_size=48, batch=3, seq=50, ignored=()):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, seq, hidden_size, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator) * 0.2).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    for row, start in ignored:
        labels[row, start:] = -100
    return hidden, weight, labels


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk", [16, 128, 1000])
@pytest.mark.parametrize("case", ["mean", "ignored", "num_items", "shift_labels"])
def test_loss_and_gradients_match_hf_fp32(chunk, case):
    hidden, weight, labels = make_inputs(ignored=((0, 30), (2, 5)) if case != "mean" else ())
    kwargs = {}
    if case == "num_items":
        kwargs["num_items_in_batch"] = torch.tensor(400)
    if case == "shift_labels":
        kwargs["shift_labels"] = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    expected = hf_loss(hidden, weight, labels, **kwargs)
    actual = linear_cross_entropy(hidden, weight, None if case == "shift_labels" else labels, chunk=chunk, **kwargs)
    assert abs(actual.item() - expected.item()) / expected.item() < 1e-6
    for a, e in zip(grads(actual * 0.7, hidden, weight), grads(expected * 0.7, hidden, weight)):
        assert relative_error(a, e) < 1e-5


def test_bf16_matches_hf_within_bf16_rounding():
    hidden, weight, labels = make_inputs(torch.bfloat16, vocab=1000, hidden_size=64, seq=64)
    exact = hf_loss(hidden.float(), weight.float(), labels)
    expected, actual = hf_loss(hidden, weight, labels), linear_cross_entropy(hidden, weight, labels, chunk=32)
    assert abs(actual.item() - expected.item()) < 1e-3 * expected.item()
    oracle = grads(exact, hidden, weight)
    for a, e, o in zip(grads(actual, hidden, weight), grads(expected, hidden, weight), oracle):
        # no further from the fp32 result than HF's own bf16 gradients, up to bf16 rounding
        assert relative_error(a, o) < relative_error(e, o) * 1.5 + 1e-3


def test_chunk_size_holds_about_256_mib_of_logits():
    assert chunk_tokens(128256) == 512
    assert chunk_tokens(49152) == 1280
    assert chunk_tokens(10**7) == 128


@pytest.mark.parametrize("chunk", [None, 256])
def test_kernel_step_writes_the_logits_where_their_gradient_goes(monkeypatch, chunk):
    """With the kernel as the step (an eager stand-in here: the kernel needs a GPU), each chunk's logits are written
    into the gradient buffer's rows and turned into their gradient in place; without a chunk size, the batch is one
    chunk. Loss and gradients as HF's."""
    import te_llama.model.lm_head_loss as module

    seen = []

    def in_place(logits, targets, row_scale, grad_out, loss_out):
        assert logits.data_ptr() == grad_out.data_ptr() and logits.shape == grad_out.shape
        seen.append(logits.shape[0])
        gradient = torch.empty_like(grad_out)
        module.loss_and_logit_grad_eager(logits, targets, row_scale, gradient, loss_out)
        grad_out.copy_(gradient)

    monkeypatch.setattr(module, "loss_and_logit_grad_kernel", in_place)
    monkeypatch.setattr(module, "_chunk_step", lambda device, step="auto": in_place)
    hidden, weight, labels = make_inputs(vocab=300, hidden_size=48, batch=3, seq=200, ignored=((1, 150),))
    actual = linear_cross_entropy(hidden, weight, labels, chunk=chunk)
    expected = hf_loss(hidden, weight, labels)
    assert seen == ([600] if chunk is None else [256, 256, 88])
    assert abs(actual.item() - expected.item()) < 1e-6 * expected.item()
    for a, e in zip(grads(actual, hidden, weight), grads(expected, hidden, weight)):
        assert relative_error(a, e) < 1e-5


def train_step(model, ids, labels, **kwargs):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
def test_model_training_step_matches_full_logits_path(hf_checkpoint, tied):
    directory, _ = hf_checkpoint(tiny_config(tie_word_embeddings=tied))
    model = TELlamaForCausalLM.from_pretrained(directory, dtype=torch.float32, device="cpu").train()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[1, 25:] = -100
    chunked, chunked_grads = train_step(model, ids, labels, num_items_in_batch=torch.tensor(70))
    model.chunked_lm_head_loss = False
    full, full_grads = train_step(model, ids, labels, num_items_in_batch=torch.tensor(70))
    assert chunked.logits is None and full.logits is not None
    assert abs(chunked.loss.item() - full.loss.item()) < 1e-6 * full.loss.item()
    assert chunked_grads.keys() == full_grads.keys()
    for name in full_grads:
        assert relative_error(chunked_grads[name], full_grads[name]) < 1e-5, name


def test_eval_and_no_grad_forwards_keep_logits(hf_checkpoint):
    directory, _ = hf_checkpoint()
    model = TELlamaForCausalLM.from_pretrained(directory, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 128, (1, 16))
    assert model(input_ids=ids, labels=ids).logits is not None  # eval mode
    model.train()
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).logits is not None
    assert model(input_ids=ids).logits is not None  # no labels
    assert model(input_ids=ids, labels=ids).logits is None


def test_compiled_chunk_step_matches_eager():
    """The step CUDA runs through torch.compile without Triton or with ``step="compiled"`` (inductor on CPU here),
    and the in-place eager step: same losses and gradient; one graph per chunk shape (full chunks, remainder), whatever the
    chunk's offset in the buffer."""
    from torch._dynamo.utils import counters

    from te_llama.model.lm_head_loss import loss_and_logit_grad, loss_and_logit_grad_eager

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(loss_and_logit_grad, fullgraph=True)
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(160, 300, generator=generator).bfloat16()
    targets = torch.randint(0, 300, (160,), generator=generator)
    scale = torch.rand(160, generator=generator)
    fused, plain, eager = (torch.empty(160, 300, dtype=torch.bfloat16) for _ in range(3))
    losses = torch.empty(3, 160)
    for start in range(0, 160, 64):
        rows = slice(start, start + 64)
        compiled(logits[rows], targets[rows], scale[rows], fused[rows], losses[0, rows])
        loss_and_logit_grad(logits[rows], targets[rows], scale[rows], plain[rows], losses[1, rows])
        loss_and_logit_grad_eager(logits[rows], targets[rows], scale[rows], eager[rows], losses[2, rows])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[2], losses[1], rtol=1e-5, atol=1e-6)
    for other in (fused, eager):
        assert (other.float() - plain.float()).abs().max().item() < 1e-2 * plain.float().abs().max().item()
    assert counters["stats"]["unique_graphs"] == 2


RUN_KERNEL = """
import sys, torch
import te_llama.kernels.lm_head_loss_triton as kernel
cases = torch.load(sys.argv[1])
for case in cases:
    kernel.BLOCK = case.pop("block")
    if case.pop("in_place"):
        case["grad"] = case["logits"]
    kernel.cross_entropy_rows(case["logits"], case["targets"], case["scale"], case["grad"], case["loss"])
torch.save(cases, sys.argv[1])
"""


def kernel_case(rows, vocab, block, in_place=False, grad_dtype=torch.bfloat16, magnitude=3.0, stride=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    storage = torch.randn(rows, stride or vocab, generator=generator) * magnitude
    logits = storage.bfloat16()[:, :vocab]  # a view with a longer row stride when stride > vocab
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[0], targets[-1] = 0, vocab - 1  # first and last column
    scale = torch.rand(rows, generator=generator) / rows
    scale[1] = 0.0  # an ignored token: its gradient row is zero, its loss 0
    return dict(logits=logits, targets=targets, scale=scale, grad=torch.full((rows, vocab), 7.0, dtype=grad_dtype),
                loss=torch.full((rows,), 7.0), block=block, in_place=in_place)


def test_loss_kernel_matches_float64_math(tmp_path):
    """The loss kernel under Triton's interpreter against float64 math: vocabularies over several blocks with a
    partial last one, a strided logits view, the gradient written over the logits (as the model runs it), logits
    large enough to overflow exp without the running maximum, bf16 and float32 gradients; a label outside the
    vocabulary gives a NaN loss."""
    cases = [kernel_case(6, 1000, 256), kernel_case(7, 1000, 256, stride=1100),
             kernel_case(6, 1000, 256, in_place=True), kernel_case(5, 300, 8192, grad_dtype=torch.float32),
             kernel_case(4, 777, 128, magnitude=60.0)]
    bad = kernel_case(3, 500, 128)
    bad["targets"][2] = 500  # outside the vocabulary: a NaN loss, no read past the row
    cases.append(bad)
    expected = [(case["logits"], case["targets"], case["scale"]) for case in cases]
    results = run_interpreted(RUN_KERNEL, tmp_path, cases)
    assert torch.isnan(results[-1]["loss"][2]) and not torch.isnan(results[-1]["loss"][:2]).any()
    for case, (logits, targets, scale) in zip(results[:-1], expected[:-1]):
        x = logits.double()
        log_normalizer = torch.logsumexp(x, dim=-1)
        loss = (log_normalizer - x.gather(1, targets[:, None])[:, 0]) * scale.double()
        grad = (torch.softmax(x, dim=-1) - torch.nn.functional.one_hot(targets, x.shape[1])) * scale.double()[:, None]
        torch.testing.assert_close(case["loss"].double(), loss, rtol=1e-6, atol=1e-9)
        # one bf16 step: Triton's interpreter truncates float32 to bf16 (the GPU rounds to nearest)
        tolerance = 2 ** -7 if case["grad"].dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(case["grad"].double(), grad, rtol=tolerance, atol=1e-12)
        assert not case["grad"][1].any() and case["loss"][1] == 0  # the ignored token


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    import te_llama.model.lm_head_loss as module

    def broken(*args):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(module, "_chunk_step", lambda device, step="auto": broken)
    monkeypatch.setattr(module, "_compiled_step", broken)
    hidden, weight, labels = make_inputs()
    with caplog.at_level("WARNING", logger="te_llama"):
        actual = linear_cross_entropy(hidden, weight, labels, chunk=64)
    assert "torch.compile failed for the LM-head loss (RuntimeError: inductor exploded)" in caplog.text
    assert module._compiled_step is module.loss_and_logit_grad_eager
    assert abs(actual.item() - hf_loss(hidden, weight, labels).item()) < 1e-6 * actual.item()


@pytest.mark.parametrize("label", [300, -1])
def test_label_outside_the_vocabulary_is_an_error(label):
    hidden, weight, labels = make_inputs(vocab=300)
    labels[1, 7] = label
    with pytest.raises(RuntimeError, match=r"labels must be token ids in \[0, 300\) .* or ignore_index \(-100\)"):
        linear_cross_entropy(hidden, weight, labels)


def test_wrapped_lm_head_takes_hf_path(hf_checkpoint):
    """A replaced LM head (an adapter, a quantized module) is called as a module, so its own forward counts."""
    directory, _ = hf_checkpoint()
    model = TELlamaForCausalLM.from_pretrained(directory, dtype=torch.float32, device="cpu").train()

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    head = Scaled(64, 128, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    ids = torch.randint(0, 128, (1, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.logits is not None
    model.lm_head = torch.nn.Linear(64, 128, bias=False)
    assert model(input_ids=ids, labels=ids).logits is None

"""The training loop several tests run: optimizer steps on one batch, repeated, for the losses along the way."""


def losses_on_one_batch(model, optimizer, steps: int, **inputs) -> list[float]:
    """``steps`` optimizer steps of ``model(**inputs).loss`` (the same batch each time: the loss falls as it is
    learnt); the loss before each step."""
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses

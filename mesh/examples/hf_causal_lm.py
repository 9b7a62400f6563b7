"""A Hugging Face causal LM trained by the mesh: GPT-2 built from a config (nothing downloaded), on the bytes of the
Python standard library's source (the text every machine has; vocab 256, one token per byte), with AdamW over
parameter groups (no weight decay on biases and norms) made by the task itself.

    pip install 'mesh[hf]'
    mesh peer --join ADDR --run hf-1 --task mesh.examples.hf_causal_lm:make_task
    mesh peer --join ADDR --run hf-1 --task mesh.examples.hf_causal_lm:make_task --task-arg n_layer=4 --bf16

``--bf16`` runs forward and backward under bf16 autocast (no loss scaler needed, unlike fp16). Every peer of a run
passes the same ``--task-arg`` (another size is another model, refused by its fingerprint). ``mesh export`` writes
the trained model as safetensors and, since it has ``save_pretrained``, as a folder ``from_pretrained`` reads.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from mesh.tasks import Task
from mesh.tasks.charlm import split


def make_task(n_layer: int = 2, n_embd: int = 64, n_head: int = 2, context: int = 64, lr: float = 1e-3, weight_decay: float = 0.1) -> Task:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise ImportError("this example needs transformers: pip install 'mesh[hf]'") from None
    config = GPT2Config(vocab_size=256, n_positions=context, n_embd=n_embd, n_layer=n_layer, n_head=n_head, loss_type="ForCausalLM")

    def windows(data: torch.Tensor, starts: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": data[starts.unsqueeze(1) + torch.arange(context)].long()}

    def make_batches(batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        train, gen = split()[0], torch.Generator().manual_seed(seed)
        while True:
            yield windows(train, torch.randint(0, len(train) - context, (batch_size,), generator=gen))

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def evaluate(model: torch.nn.Module) -> float:
        held_out = split()[1]
        batch = windows(held_out, torch.linspace(0, len(held_out) - context - 1, 32).long())
        device = next(model.parameters()).device
        return loss(model, {k: v.to(device) for k, v in batch.items()}).item()

    def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
        decay = [p for name, p in model.named_parameters() if p.ndim >= 2]
        rest = [p for name, p in model.named_parameters() if p.ndim < 2]  # biases and LayerNorm weights
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]

    return Task(
        name=f"hf-gpt2-{n_layer}x{n_embd}",
        make_model=lambda: GPT2LMHeadModel(config),
        make_batches=make_batches,
        loss=loss,
        evaluate=evaluate,
        param_groups=param_groups,
        make_optimizer=lambda groups: torch.optim.AdamW(groups, lr=lr),
        description=f"Hugging Face GPT-2 ({n_layer} layers, {n_embd} wide, context {context}) on the standard library's bytes",
        defaults={"batch_size": 16, "target_batch_size": 256},
    )

"""The backbone classifier: a Hugging Face encoder with a ReLU → Dropout → Linear head on [CLS].

train_backbone fine-tunes it on the dataset (the encoder the finetune router starts from), and
evaluate scores it beside the router. A ``backbone/`` directory holds the encoder's
``save_pretrained`` files, its tokenizer, ``classifier.safetensors`` (the head), ``labels.json`` and
``metrics.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moegate.io import atomic_dir, read_json, write_json
from moegate.training import TokenSplit, to_device

HEAD_FILE = "classifier.safetensors"



class ClassifierHead(nn.Module):
    """ReLU → Dropout → Linear: [CLS] hidden state (B, H) → expert logits (B, K)."""

    def __init__(self, hidden_size: int, num_experts: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, num_experts)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(torch.relu(cls)))


class BackboneClassifier(nn.Module):
    """A Hugging Face encoder with a :class:`ClassifierHead` on its first ([CLS]) token."""

    def __init__(self, encoder: nn.Module, head: ClassifierHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden[:, 0])


def classify(model: BackboneClassifier, split: TokenSplit, batch_size: int, device: torch.device) -> torch.Tensor:
    """Logits (rows, K) for every row of ``split``, in order, in eval mode."""
    model.eval()
    out = []
    with torch.inference_mode():
        for batch in split.batches(batch_size):
            batch = to_device(batch, device)
            out.append(model(batch["input_ids"], batch["attention_mask"]).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, model.head.linear.out_features))


def save_backbone(out_dir: str | Path, model: BackboneClassifier, tokenizer, labels: list[str],
                  metrics: dict) -> None:
    """Write the backbone directory atomically: encoder, tokenizer, head, labels.json, metrics.json."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        model.encoder.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
        save_file(head, str(tmp / HEAD_FILE), metadata={"format": "pt", "dropout": str(model.head.dropout.p)})
        write_json(tmp / "labels.json", {"labels": labels})
        write_json(tmp / "metrics.json", metrics)


def load_backbone_classifier(directory: str | Path):
    """(encoder, head, tokenizer, labels) from a ``backbone/`` directory, in eval mode on the CPU."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    directory = Path(directory)
    for name in ("config.json", "model.safetensors", HEAD_FILE, "labels.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing from the backbone directory "
                                    "(did train_backbone finish?)")
    labels = read_json(directory / "labels.json")["labels"]
    encoder = AutoModel.from_pretrained(directory).eval()
    tensors = load_file(str(directory / HEAD_FILE))
    weight = tensors.get("linear.weight")
    if weight is None or weight.shape != (len(labels), encoder.config.hidden_size):
        raise ValueError(f"{directory / HEAD_FILE}: expected linear.weight of shape "
                         f"({len(labels)}, {encoder.config.hidden_size}) for labels.json and the encoder, got "
                         f"{None if weight is None else tuple(weight.shape)}")
    head = ClassifierHead(encoder.config.hidden_size, len(labels))
    head.load_state_dict(tensors)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return encoder, head.eval(), tokenizer, labels

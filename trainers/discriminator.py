"""The naturalness discriminator of stage `scst`: a transformers sequence classifier that tells corpus sentences
(real) from generated captions (fake), trained by binary cross-entropy with its own optimizer and scheduler.

Its logit of "real" is the captioner's naturalness reward. Real recipes fine-tune a pretrained encoder
(`Discriminator.from_pretrained("roberta-base")`, as CgT-GAN does); the offline shapes world builds a tiny one from
scratch on the caption tokenizer's vocabulary (`Discriminator.from_config("configs/models/x.json", tokenizer)`).

Under several processes every process holds the whole discriminator and trains it on its own captions; its
gradients are averaged over the processes before every step (`all_reduce_gradients`), so the copies stay identical
whatever wraps the captioner (DDP, DeepSpeed, FSDP).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

from .common import pad_right

TRAINING_STATE = "training_state.pt"


@dataclass
class DiscriminatorOutput:
    """Binary cross-entropy on a batch of real and fake sentences, and the share of each the classifier gets right."""

    loss: torch.Tensor
    accuracy_real: float
    accuracy_fake: float


class Discriminator:
    """A sequence classifier with one logit ("real"), its tokenizer, optimizer and learning-rate scheduler.

    Args:
        model: a transformers `...ForSequenceClassification` with `num_labels=1`.
        tokenizer: its tokenizer. One that adds no special tokens of its own (a word-level caption tokenizer) gets its
            BOS (or EOS) token in front of every sentence, as the position the classifier pools.
        max_length: tokens per sentence, longer ones are cut.
        learning_rate, weight_decay: AdamW settings.
        lr_scheduler_type, warmup_steps: the scheduler (`transformers.get_scheduler` names), made by
            `create_scheduler` once the number of training steps is known.
        max_grad_norm: gradient clipping (0 turns it off).
    """

    def __init__(self, model, tokenizer, max_length: int = 40, learning_rate: float = 1e-5, weight_decay: float = 0.0,
                 lr_scheduler_type: str = "constant", warmup_steps: int = 0, max_grad_norm: float = 1.0):
        if model.config.num_labels != 1:
            raise ValueError(f"the discriminator needs one output logit (num_labels=1), got {model.config.num_labels}.")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.lr_scheduler_type = lr_scheduler_type
        self.warmup_steps = warmup_steps
        self.max_grad_norm = max_grad_norm
        self.class_token_id = None if _adds_special_tokens(tokenizer) else _class_token(tokenizer)
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=learning_rate, weight_decay=weight_decay)
        self.scheduler = None

    @classmethod
    def from_pretrained(cls, name_or_path: str, **settings) -> "Discriminator":
        """A pretrained encoder (Hub id such as `roberta-base`, or a folder) with a new one-logit head."""
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1)
        return cls(model, AutoTokenizer.from_pretrained(name_or_path), **settings)

    @classmethod
    def from_config(cls, config: str | Path | dict, tokenizer, **settings) -> "Discriminator":
        """A classifier trained from scratch on `tokenizer`'s vocabulary.

        Args:
            config: a transformers config (JSON file or dict with `model_type`, e.g. a small `bert`); its vocabulary
                size and padding token are taken from `tokenizer`.
            tokenizer: the tokenizer of the sentences (usually the caption tokenizer).
        """
        values = json.loads(Path(config).read_text()) if isinstance(config, (str, Path)) else dict(config)
        if "model_type" not in values:
            raise ValueError(f"the discriminator config {config} needs a model_type (e.g. \"bert\").")
        class_token_id = None if _adds_special_tokens(tokenizer) else _class_token(tokenizer)
        # A padding id that is also the pooled token (GPT-2's pad = bos = eos) would pin that embedding at zero.
        pad_token_id = None if tokenizer.pad_token_id == class_token_id else tokenizer.pad_token_id
        model_config = AutoConfig.for_model(**{
            **values, "vocab_size": len(tokenizer), "pad_token_id": pad_token_id, "num_labels": 1})
        limit = settings.get("max_length", 40) + 2
        if getattr(model_config, "max_position_embeddings", limit) < limit:
            raise ValueError(f"the discriminator config {config} has max_position_embeddings="
                             f"{model_config.max_position_embeddings}, fewer than the {limit} positions a sentence "
                             "may take: raise it or lower discriminator_max_length.")
        return cls(AutoModelForSequenceClassification.from_config(model_config), tokenizer, **settings)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The classifier's trainable parameters."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "Discriminator":
        self.model.to(device)  # in place: the optimizer keeps pointing at the same parameters
        return self

    def create_scheduler(self, num_training_steps: int):
        self.scheduler = get_scheduler(self.lr_scheduler_type, self.optimizer, num_warmup_steps=self.warmup_steps,
                                       num_training_steps=num_training_steps)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Padded `input_ids` and `attention_mask` on the discriminator's device."""
        if self.class_token_id is None:
            batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt")
            batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        else:
            batch = self._encode_with_class_token(texts)
        return {name: tensor.to(self.device) for name, tensor in batch.items()}

    def _encode_with_class_token(self, texts: list[str]) -> dict[str, torch.Tensor]:
        rows = self.tokenizer(list(texts), add_special_tokens=False, truncation=True,
                              max_length=self.max_length - 1)["input_ids"]
        return pad_right([[self.class_token_id] + ids for ids in rows], self.tokenizer.pad_token_id)

    def logits(self, texts: list[str]) -> torch.Tensor:
        """(N,) logits of "real", in training mode (dropout on), with gradient."""
        self.model.train()
        return self.model(**self.encode(texts)).logits[:, 0].float()

    @torch.no_grad()
    def scores(self, texts: list[str]) -> torch.Tensor:
        """(N,) logits of "real" in evaluation mode: the naturalness reward."""
        self.model.eval()
        return self.model(**self.encode(texts)).logits[:, 0].float()

    def loss(self, real: list[str], fake: list[str]) -> DiscriminatorOutput:
        """Binary cross-entropy of real (label 1) and fake (label 0) sentences, one batch."""
        logits = self.logits(list(real) + list(fake))
        labels = torch.cat((torch.ones(len(real)), torch.zeros(len(fake)))).to(logits.device)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        with torch.no_grad():
            accuracy_real = (logits[: len(real)] > 0).float().mean().item()
            accuracy_fake = (logits[len(real):] < 0).float().mean().item()
        return DiscriminatorOutput(loss, accuracy_real, accuracy_fake)

    def all_reduce_gradients(self):
        """Average the gradients over all processes (one collective); a no-op in a single process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        parameters = self.parameters()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in parameters])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for parameter, grad in zip(parameters, flat.split([p.numel() for p in parameters])):
            parameter.grad = grad.view_as(parameter).clone()

    def clip_gradients(self) -> torch.Tensor:
        """Clip to `max_grad_norm` (when > 0); returns the norm before clipping (non-finite when a gradient is)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        if self.max_grad_norm > 0:
            return torch.nn.utils.clip_grad_norm_(self.parameters(), self.max_grad_norm)
        return torch.nn.utils.get_total_norm(grads)

    def step(self):
        """Apply the gradients, advance the schedule, clear the gradients."""
        if self.scheduler is None:
            raise RuntimeError("create_scheduler(num_training_steps) must be called before the first step.")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self):
        """Drop the gradients: the optimizer step changes nothing (AdamW passes over parameters without gradient),
        and the schedule still advances with the training steps."""
        self.optimizer.zero_grad(set_to_none=True)
        self.step()

    def save(self, folder: str | Path, extra_state: dict | None = None):
        """Weights and tokenizer (a transformers folder), optimizer, scheduler and `extra_state` into `folder`."""
        folder = Path(folder)
        self.model.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                    "extra": extra_state or {}}, folder / TRAINING_STATE)

    def load(self, folder: str | Path) -> dict:
        """Restore what `save` wrote (the scheduler must exist already); returns the saved `extra_state`."""
        folder = Path(folder)
        if not (folder / TRAINING_STATE).is_file():
            raise FileNotFoundError(f"{folder} holds no saved discriminator ({TRAINING_STATE} is missing): resume "
                                    "from a checkpoint of the scst stage.")
        saved = type(self.model).from_pretrained(str(folder))
        self.model.load_state_dict(saved.state_dict())
        state = torch.load(folder / TRAINING_STATE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        return state["extra"]


def _adds_special_tokens(tokenizer) -> bool:
    return len(tokenizer("a")["input_ids"]) != len(tokenizer("a", add_special_tokens=False)["input_ids"])


def _class_token(tokenizer) -> int:
    for token_id in (tokenizer.cls_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError("the discriminator's tokenizer adds no special tokens and has no CLS, BOS or EOS token to pool.")

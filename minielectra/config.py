"""Model and training configuration: dataclasses with commented defaults, the 'tiny' and 'small' presets, JSON in/out.

Field names follow Hugging Face's ElectraConfig where one exists, so a config.json maps over by name. Every check that
can fail runs in `validate()`, called before any work starts, so a bad combination is reported in one clear line
instead of a shape error deep inside a matrix product.
"""

import dataclasses
import json
from dataclasses import dataclass

N_SPECIAL_TOKENS = 5  # [PAD] [UNK] [CLS] [SEP] [MASK]
OBJECTIVES = ("electra", "mlm")  # TrainConfig.objective: minielectra/electra.py or minielectra/mlm.py


class ConfigError(ValueError):
    """A configuration that cannot work; the message says which fields and how to fix them."""


@dataclass
class ElectraConfig:
    vocab_size: int = 8192
    embedding_size: int = 128  # E: the shared embedding tables' width; each encoder projects E -> hidden if they differ
    hidden_size: int = 128  # discriminator width
    num_hidden_layers: int = 4  # both encoders have this many layers
    num_attention_heads: int = 2
    intermediate_size: int = 512  # FFN width F
    generator_hidden_size: int = 32  # 1/4 of the discriminator, as ELECTRA-Small
    generator_num_attention_heads: int = 1  # max(1, generator_hidden_size // 64)
    generator_intermediate_size: int = 128  # 4 x generator_hidden_size
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02  # sigma of the truncated normal init
    mask_prob: float = 0.15  # share of non-special tokens the generator must predict
    rtd_weight: float = 50.0  # loss = mlm + rtd_weight * rtd
    # Gumbel-max sampling temperature for the generator's replacements: the paper's 1. Above 1 the replacements are
    # easier to spot, which lets the tiny preset's discriminator learn within an hour (README: the experiment).
    temperature: float = 1.0
    # Special token ids, set from the tokenizer's vocab (a trained vocab puts them at 0-4, BERT's at 0 and 101-103).
    pad_token_id: int = 0
    cls_token_id: int = 2
    sep_token_id: int = 3
    mask_token_id: int = 4

    def validate(self):
        problems = []
        for prefix, hidden, heads, ffn in (
            ("", self.hidden_size, self.num_attention_heads, self.intermediate_size),
            ("generator_", self.generator_hidden_size, self.generator_num_attention_heads,
             self.generator_intermediate_size),
        ):
            if min(hidden, heads, ffn) < 1:
                problems.append(f"{prefix}hidden_size, {prefix}num_attention_heads and {prefix}intermediate_size "
                                f"must be positive (got {hidden}, {heads}, {ffn})")
            elif hidden % heads:
                problems.append(f"{prefix}hidden_size {hidden} is not divisible by {prefix}num_attention_heads "
                                f"{heads}: pick heads that divide it")
        if self.generator_hidden_size > self.hidden_size:
            problems.append(f"generator_hidden_size {self.generator_hidden_size} is larger than the discriminator's "
                            f"hidden_size {self.hidden_size}: ELECTRA's generator is the smaller model (1/4 of it)")
        if self.vocab_size <= N_SPECIAL_TOKENS:
            problems.append(f"vocab_size {self.vocab_size} leaves no room for words beside the "
                            f"{N_SPECIAL_TOKENS} special tokens [PAD] [UNK] [CLS] [SEP] [MASK]")
        specials = (self.pad_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id)
        if not all(0 <= t < self.vocab_size for t in specials):
            problems.append(f"special token ids {specials} must lie in [0, vocab_size {self.vocab_size})")
        if min(self.embedding_size, self.num_hidden_layers, self.max_position_embeddings, self.type_vocab_size) < 1:
            problems.append("embedding_size, num_hidden_layers, max_position_embeddings and type_vocab_size must be positive")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.mask_prob < 1.0:
            problems.append(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.temperature <= 0:
            problems.append(f"temperature must be positive, got {self.temperature}")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))
        return self


@dataclass
class TrainConfig:
    seq_len: int = 128  # tokens per packed sequence, [CLS] and [SEP] included
    batch_size: int = 32
    steps: int = 800  # the tiny preset's default run: about 2 minutes on 2 cores with the Numba kernels
    learning_rate: float = 5e-4
    warmup_steps: int = 80  # linear warm-up, then linear decay to 0 at `steps`
    weight_decay: float = 0.01  # not applied to biases and LayerNorm
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-6
    max_grad_norm: float = 1.0  # global-norm clipping
    seed: int = 0
    log_every: int = 10  # steps between metric lines
    checkpoint_every: int = 400  # steps between checkpoints (one is always written at the end)
    eval_fraction: float = 0.02  # share of packed sequences held out for evaluation
    objective: str = "electra"  # pre-training objective: electra (generator + discriminator) or mlm (BERT's masked LM)
    # Each batch is split into this many shards, run on the CPU cores side by side (parallel.py); 0 = one per core on
    # the host, 1 on a GPU, fixed when a run starts and saved with it: a run's numbers depend on its shard count.
    shards: int = 0

    def validate(self, model=None):
        problems = []
        for name in ("seq_len", "batch_size", "steps", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 3:
            problems.append(f"seq_len {self.seq_len} has no room for a token between [CLS] and [SEP]")
        if model is not None and self.seq_len > model.max_position_embeddings:
            problems.append(f"seq_len {self.seq_len} exceeds max_position_embeddings "
                            f"{model.max_position_embeddings}: shorten seq_len or raise max_position_embeddings")
        if self.learning_rate <= 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            problems.append("learning_rate and max_grad_norm must be positive; warmup_steps and weight_decay >= 0")
        if not 0 <= self.shards <= self.batch_size:
            problems.append(f"shards must be in [0, batch_size {self.batch_size}] (0: one per CPU core), got "
                            f"{self.shards}")
        if not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.objective not in OBJECTIVES:
            problems.append(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))
        return self


PRESETS = {
    "tiny": (ElectraConfig(), TrainConfig()),
    # ELECTRA-Small exactly as the paper's Table 6 and the official code: 13.5 M parameters.
    "small": (
        ElectraConfig(vocab_size=30522, embedding_size=128, hidden_size=256, num_hidden_layers=12,
                      num_attention_heads=4, intermediate_size=1024, generator_hidden_size=64,
                      generator_num_attention_heads=1, generator_intermediate_size=256),
        TrainConfig(seq_len=128, batch_size=128, steps=1_000_000, warmup_steps=10_000, checkpoint_every=10_000),
    ),
}


def preset(name):
    """Fresh copies of the (ElectraConfig, TrainConfig) pair called `name`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    model, train = PRESETS[name]
    return dataclasses.replace(model), dataclasses.replace(train)


def _coerce(cls, field, value):
    """value converted to the field's declared type, so '64' from a command line becomes 64."""
    kind = {f.name: f.type for f in dataclasses.fields(cls)}[field]
    kind = {"int": int, "float": float}.get(kind, kind) if isinstance(kind, str) else kind
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{cls.__name__}.{field} must be {kind.__name__}, got {value!r}") from None


def override(config, values):
    """A copy of the dataclass `config` with `values` (a dict of field -> value) applied; unknown fields are an error."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown {type(config).__name__} field(s) {', '.join(unknown)}; "
                          f"known fields: {', '.join(sorted(names))}")
    return dataclasses.replace(config, **{k: _coerce(type(config), k, v) for k, v in values.items()})


def to_json(model, train):
    return json.dumps({"model": dataclasses.asdict(model), "train": dataclasses.asdict(train)}, indent=2)


def from_json(text):
    """(ElectraConfig, TrainConfig) from to_json's output; a file may hold only one of the two sections."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not set(data) <= {"model", "train"}:
        raise ConfigError('a config JSON holds an object with "model" and/or "train" sections')
    return (override(ElectraConfig(), data.get("model", {})), override(TrainConfig(), data.get("train", {})))

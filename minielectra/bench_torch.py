"""`minielectra bench --vs-torch`: the same ELECTRA training step in PyTorch + Hugging Face transformers, side by side.

Optional: torch and transformers are imported only here, only when asked for, and are never a dependency of the
package or its tests. Nothing is downloaded: both models are built from `transformers.ElectraConfig` with random init.

The PyTorch step does what `bench.make_step`'s does, on the same fixed random batch of full-length sequences:
- masking: `electra.mask_tokens` in NumPy (our step runs the very same code), converted to tensors;
- generator = `ElectraForMaskedLM` at the generator's sizes; its encoder runs on the masked sequence, the hidden states
  at the picked positions are gathered, and only those go through `generator_predictions` and the tied LM head;
- Gumbel-max sampling under `torch.no_grad()`; labels = sampled != original;
- discriminator = `ElectraForPreTraining`; sigmoid cross-entropy over the non-pad tokens;
- loss = mlm + rtd_weight * rtd, backward, `clip_grad_norm_`, `torch.optim.AdamW` (no decay on biases and LayerNorm,
  the learning rate set from our schedule every step);
- shared embeddings: the generator's `electra.embeddings` IS the discriminator's module (word, position, token type,
  LayerNorm), and the generator's LM head weight IS the word table, so one table gets all three gradients;
- float32, train mode (dropout as the config says), eager execution, `torch.set_num_threads` = the threads our step
  keeps busy (its shards' threads times the BLAS threads each runs with: parallel.threads_busy).

Two differences that do not change the work done: torch's AdamW applies bias correction (ours, as ELECTRA's, does not),
and HF initialises with a plain normal (ours: truncated normal). `attn_implementation` defaults to HF's own default,
"sdpa" (PyTorch's fused scaled_dot_product_attention); "eager" is HF's matmul-softmax-matmul, closer to ours.
"""

import os
import statistics
import sys

import numpy as np

from minielectra import backend, bench, electra, parallel
from minielectra.config import ElectraConfig
from minielectra.optim import learning_rate, no_decay

MISSING = "--vs-torch needs torch and transformers: pip install torch transformers"


def _import():
    """(torch, transformers), or an ImportError that says what to install.

    PyTorch brings an OpenMP runtime of its own, which reads OMP_WAIT_POLICY once, when torch is imported. The Numba
    kernels set it to PASSIVE for theirs (kernels/numba_cpu/__init__.py) unless the user had set it; torch is imported
    without that setting, so that it runs as it would on its own: under PASSIVE its tiny-preset step took 360-369 ms
    against 304-308 (2 threads, separate processes).
    """
    ours = sys.modules.get("minielectra.kernels.numba_cpu")
    hide = ours is not None and ours.WAIT_POLICY_SET_HERE and "torch" not in sys.modules
    policy = os.environ.pop("OMP_WAIT_POLICY", None) if hide else None
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(MISSING) from e
    finally:
        if policy is not None:
            os.environ["OMP_WAIT_POLICY"] = policy
    return torch, transformers


def hf_config(config: ElectraConfig, which, attn_implementation="sdpa"):
    """A transformers.ElectraConfig for our generator or discriminator (same layer count, embeddings and dropout)."""
    _, transformers = _import()
    gen = which == electra.GEN
    return transformers.ElectraConfig(
        vocab_size=config.vocab_size, embedding_size=config.embedding_size,
        hidden_size=config.generator_hidden_size if gen else config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.generator_num_attention_heads if gen else config.num_attention_heads,
        intermediate_size=config.generator_intermediate_size if gen else config.intermediate_size,
        hidden_act="gelu",  # exact erf GELU, as ours
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
        initializer_range=config.initializer_range, layer_norm_eps=config.layer_norm_eps,
        pad_token_id=config.pad_token_id, attn_implementation=attn_implementation)


class TorchStep:
    """One full ELECTRA training step in PyTorch per call (returns the loss as a float). Attributes: generator,
    discriminator, optimizer, params (each shared tensor once), threads, attn_implementation, device.

    device: "cpu", or "cuda" to compare with the cupy backend: models, batch and optimizer state live there, and
    float32 matmuls use TF32 exactly when ours do (backend.tf32_enabled()), so the two steps do the same arithmetic.
    """

    def __init__(self, config: ElectraConfig, train, batch_size, seq_len, seed=0, attn_implementation="sdpa",
                 threads=None, device="cpu"):
        torch, transformers = _import()
        self.torch, self.config, self.train = torch, config, train
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = backend.tf32_enabled()
        self.threads = threads or parallel.blas_threads()
        torch.set_num_threads(self.threads)
        torch.manual_seed(seed)
        self.attn_implementation = attn_implementation
        self.generator = transformers.ElectraForMaskedLM(hf_config(config, electra.GEN, attn_implementation))
        self.discriminator = transformers.ElectraForPreTraining(hf_config(config, electra.DISC, attn_implementation))
        shared = self.discriminator.electra.embeddings
        self.generator.electra.embeddings = shared  # word, position, token type tables and the LayerNorm: one module
        self.generator.generator_lm_head.weight = shared.word_embeddings.weight  # tied LM head: logits = h @ E.T + b
        for model in (self.generator, self.discriminator):
            model.float().train().to(self.device)

        seen, decay, plain = set(), [], []
        for prefix, model in ((electra.GEN, self.generator), (electra.DISC, self.discriminator)):
            for name, p in model.named_parameters(remove_duplicate=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    (plain if no_decay(f"{prefix}.{name}") else decay).append(p)
        self.params = decay + plain
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": train.weight_decay}, {"params": plain, "weight_decay": 0.0}],
            lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon)

        self.rng = np.random.default_rng(seed + 1)
        ids, mask = bench._random_batch(config, batch_size, seq_len, self.rng)
        self.ids_np, self.mask_np = ids, mask
        self.ids, self.mask = torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)
        self.types = torch.zeros_like(self.ids)
        self.counter = 0

    def count_params(self):
        return sum(p.numel() for p in self.params)

    def __call__(self):
        torch, config = self.torch, self.config
        F = torch.nn.functional
        B, T = self.ids.shape
        m = electra.mask_tokens(self.ids_np, self.mask_np, config, self.rng)  # the same NumPy work our step does
        picked = m.weights.reshape(-1) > 0
        rows = torch.from_numpy((np.arange(B)[:, None] * T + m.positions).reshape(-1)[picked]).to(
            self.device)  # (N,) flat positions
        targets = self.ids.reshape(-1)[rows]  # (N,)
        lr = learning_rate(self.counter, self.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        gen = self.generator
        gh = gen.electra(input_ids=torch.from_numpy(m.masked_ids).to(self.device), attention_mask=self.mask,
                         token_type_ids=self.types).last_hidden_state  # (B, T, Cg)
        h = gh.reshape(B * T, -1).index_select(0, rows)  # (N, Cg): the head runs at the picked positions only
        logits = gen.generator_lm_head(gen.generator_predictions(h))  # (N, V)
        mlm = F.cross_entropy(logits, targets)
        with torch.no_grad():  # Gumbel-max, as ops.softmax.gumbel_sample: no gradient through the sample
            u = torch.rand(logits.shape, device=self.device)
            g = -torch.log(-torch.log(u + 1e-9) + 1e-9)
            samples = torch.argmax(logits / config.temperature + g, dim=-1)  # (N,)
            corrupted = self.ids.clone()
            corrupted.view(-1)[rows] = samples
            labels = (corrupted != self.ids).float()  # (B, T)
        dlogits = self.discriminator(input_ids=corrupted, attention_mask=self.mask,
                                     token_type_ids=self.types).logits  # (B, T)
        real = self.mask.float()
        rtd = (F.binary_cross_entropy_with_logits(dlogits, labels, reduction="none") * real).sum() / real.sum()
        loss = mlm + config.rtd_weight * rtd

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.train.max_grad_norm)
        self.optimizer.step()
        self.counter += 1
        return loss.item()


def torch_step(config: ElectraConfig, train, batch_size, seq_len, seed=0, attn_implementation="sdpa", device="cpu"):
    """A callable running one full ELECTRA training step in PyTorch eager on a fixed random batch (see TorchStep)."""
    return TorchStep(config, train, batch_size, seq_len, seed, attn_implementation, device=device)


def compare(config: ElectraConfig, train, batch_size, seq_len, steps=20, warmup=3, attn_implementation="sdpa"):
    """Our step and the PyTorch step timed in interleaved runs; medians, tokens/s, ratio (ours / torch), MFU of each.

    bench.time_interleaved times them. Under the cupy backend the PyTorch step runs on CUDA, and both are timed
    between device synchronisations.
    """
    torch, transformers = _import()
    device = "cuda" if backend.active_backend() == "cupy" else "cpu"
    ours, params, plan = bench.make_step(config, train, batch_size, seq_len)  # synchronises the GPU before it returns
    theirs = TorchStep(config, train, batch_size, seq_len, attn_implementation=attn_implementation,
                       threads=plan["threads_busy"], device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    first = {"ours": float(ours()), "torch": theirs()}  # step 0's losses: both near ln V + rtd_weight ln 2
    for _ in range(max(0, warmup - 1)):
        ours()
        theirs()
    times = bench.time_interleaved({"ours": ours, "torch": theirs}, steps, sync)
    flops = bench.model_flops(config, batch_size, seq_len)
    gemm = bench.gemm_flops_per_s(xp=backend.array_module())
    tokens = batch_size * seq_len
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "backend": backend.active_backend(), "device": device, "tf32": backend.tf32_enabled(),
        "batch": batch_size, "seq": seq_len, "steps": steps, "warmup": warmup,
        "threads": theirs.threads, "torch_threads": torch.get_num_threads(),
        "shards": plan["shards"], "shard_threads": plan["threads"],
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "attn_implementation": attn_implementation,
        "params_m_ours": electra.count_params(params) / 1e6, "params_m_torch": theirs.count_params() / 1e6,
        "first_loss_ours": first["ours"], "first_loss_torch": first["torch"],
        "starting_loss": electra.starting_loss(config.vocab_size, config.rtd_weight), "rtd_weight": config.rtd_weight,
        "s_per_step_ours": med["ours"], "s_per_step_torch": med["torch"],
        "s_per_step_min_ours": min(times["ours"]), "s_per_step_min_torch": min(times["torch"]),
        "tokens_per_s_ours": tokens / med["ours"], "tokens_per_s_torch": tokens / med["torch"],
        "ratio": med["torch"] / med["ours"],  # = ours tokens/s / torch tokens/s
        "model_gflop_per_step": flops / 1e9, "gemm_gflop_per_s": gemm / 1e9,
        "mfu_ours": flops / med["ours"] / gemm, "mfu_torch": flops / med["torch"] / gemm,
    }


def format_comparison(d):
    ours = (f"; ours splits each batch into {d['shards']} shards on {d['shard_threads']} threads" if d["shards"] > 1
            else "")
    rows = [
        f"vs PyTorch {d['torch_version']} + transformers {d['transformers_version']} on {d['device']}"
        f"{' with TF32 GEMMs' if d['tf32'] else ''} (attention: {d['attn_implementation']}), {d['threads']} threads "
        f"each{ours}; {d['steps']} interleaved steps after "
        f"{d['warmup']} warm-up, batch {d['batch']} x seq {d['seq']}",
        f"{'':<16} {'minielectra (' + d['backend'] + ')':>22} {'pytorch':>12}",
        f"{'params (M)':<16} {d['params_m_ours']:>22.2f} {d['params_m_torch']:>12.2f}",
        f"{'loss at step 0':<16} {d['first_loss_ours']:>22.3f} {d['first_loss_torch']:>12.3f}   "
        f"(ln V + {d['rtd_weight']:g} ln 2 = {d['starting_loss']:.3f})",
        f"{'s/step median':<16} {d['s_per_step_ours']:>22.4f} {d['s_per_step_torch']:>12.4f}",
        f"{'s/step min':<16} {d['s_per_step_min_ours']:>22.4f} {d['s_per_step_min_torch']:>12.4f}",
        f"{'tokens/s':<16} {d['tokens_per_s_ours']:>22,.0f} {d['tokens_per_s_torch']:>12,.0f}",
        f"{'MFU':<16} {d['mfu_ours']:>22.3f} {d['mfu_torch']:>12.3f}",
        f"tokens/s ratio minielectra / pytorch: {d['ratio']:.2f}x",
    ]
    return "\n".join(rows)

"""`bench --vs-torch`: the PyTorch + transformers step is the same model and step as ours, and compare() runs.

torch and transformers are never test dependencies: the tests that need them skip where they are missing (a
ModuleNotFoundError, which importorskip turns into a skip without any warning). The clear-error test runs everywhere.
"""

import math
import sys

import numpy as np
import pytest

from minielectra import bench_torch, electra
from minielectra.config import ElectraConfig, TrainConfig

MICRO = ElectraConfig(vocab_size=100, embedding_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, generator_hidden_size=4, generator_num_attention_heads=1,
                      generator_intermediate_size=16, max_position_embeddings=64)
TRAIN = TrainConfig(batch_size=2, seq_len=16)


@pytest.fixture
def torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    threads = torch.get_num_threads()
    yield torch
    torch.set_num_threads(threads)  # the step sets it to our BLAS's count; leave the process as it was


def test_torch_step_starts_at_ln_v_plus_50_ln_2_and_shares_the_embeddings(torch):
    step = bench_torch.torch_step(MICRO, TRAIN, 2, 16)
    gen, disc = step.generator, step.discriminator
    table = disc.electra.embeddings.word_embeddings.weight
    assert gen.electra.embeddings is disc.electra.embeddings  # word, position, type tables and LayerNorm: one module
    assert gen.electra.embeddings.word_embeddings.weight is table
    assert gen.generator_lm_head.weight is table  # tied LM head
    # Same architecture as ours: the same parameter count, shared tensors counted once.
    assert step.count_params() == electra.count_params(electra.init_model(MICRO, np.random.default_rng(0)))
    assert torch.get_num_threads() == step.threads
    before = table.detach().clone()
    loss = step()
    assert math.isfinite(loss)
    assert loss == pytest.approx(electra.starting_loss(MICRO.vocab_size, MICRO.rtd_weight), rel=0.02)
    assert not torch.equal(before, table.detach())  # the one shared table was updated
    assert step.optimizer.param_groups[1]["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in step.optimizer.param_groups[1]["params"])  # biases and LayerNorm only


def test_compare_returns_a_positive_ratio_and_prints_a_table(torch):
    d = bench_torch.compare(MICRO, TRAIN, 2, 16, steps=2, warmup=1)
    assert d["ratio"] > 0
    assert d["ratio"] == pytest.approx(d["tokens_per_s_ours"] / d["tokens_per_s_torch"])
    assert d["mfu_ours"] > 0 and d["mfu_torch"] > 0
    assert d["params_m_ours"] == pytest.approx(d["params_m_torch"])
    assert d["first_loss_torch"] == pytest.approx(d["starting_loss"], rel=0.02)
    text = bench_torch.format_comparison(d)
    assert "tokens/s" in text and "ratio" in text and d["torch_version"] in text


def test_missing_torch_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError, installed or not
    with pytest.raises(ImportError, match="--vs-torch needs torch and transformers: pip install torch transformers"):
        bench_torch.torch_step(MICRO, TRAIN, 2, 16)
    with pytest.raises(ImportError, match="pip install torch transformers"):
        bench_torch.compare(MICRO, TRAIN, 2, 16, steps=1, warmup=1)


def test_bench_command_vs_torch_prints_the_table_and_json(torch, capsys):
    import json

    from minielectra.cli import main

    argv = ["bench", "--steps", "2", "--warmup", "1", "--batch", "2", "--seq", "16", "--vs-torch", "--json"]
    for field, value in MICRO.__dict__.items():
        if not field.endswith("token_id"):
            argv += ["--set", f"{field}={value}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "tokens/s ratio minielectra / pytorch" in out
    assert json.loads(out.strip().splitlines()[-1])["vs_torch"]["ratio"] > 0


@pytest.mark.parametrize("user_policy", [None, "ACTIVE"])
def test_torch_is_imported_with_the_users_openmp_wait_policy_not_ours(tmp_path, user_policy):
    """The Numba kernels' PASSIVE policy (kernels/numba_cpu) is theirs: PyTorch's OpenMP runtime reads the variable
    when torch is imported, and under PASSIVE its step ran ~20 % slower. Stand-in torch and transformers modules record
    what they see when imported, in a fresh interpreter (the real torch may already be imported in this one)."""
    pytest.importorskip("numba")
    import os
    import subprocess

    for name in ("torch", "transformers"):
        (tmp_path / f"{name}.py").write_text("import os\nSEEN = os.environ.get('OMP_WAIT_POLICY')\n")
    code = ("import os; from minielectra import backend, bench_torch; backend.set_backend('numba'); "
            "torch, transformers = bench_torch._import(); "
            "print(torch.SEEN, transformers.SEEN, os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user_policy:
        env["OMP_WAIT_POLICY"] = user_policy
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    expected = [str(user_policy), str(user_policy), user_policy or "PASSIVE"]  # ours is back after the import
    assert done.stdout.split() == expected

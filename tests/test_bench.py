"""The benchmark's FLOP formula against a count by hand, and the command's JSON line."""

import json

import pytest

from minielectra import backend, bench
from minielectra.cli import main
from minielectra.config import ElectraConfig

MICRO = ElectraConfig(vocab_size=100, embedding_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, generator_hidden_size=4, generator_num_attention_heads=1,
                      generator_intermediate_size=16, max_position_embeddings=64)


def test_model_flops_by_hand():
    B, T = 3, 20
    rows, masked = B * T, B * 3  # round(0.15 * 18) = 3 picks per sequence (cap int(0.155 * 20) = 3)
    assert bench.masked_tokens(MICRO, B, T) == masked
    gen = 2 * (4 * 4 * 4 + 2 * 4 * 16) + 8 * 4  # two layers of Q, K, V, O and FFN at width 4; project 8 -> 4
    disc = 2 * (4 * 16 * 16 + 2 * 16 * 32) + 8 * 16
    heads_rows = 16 * 16 + 16  # discriminator head, every token
    heads_masked = 4 * 8 + 8 * 100  # generator dense 4 -> 8, tied LM head 8 -> 100, picked tokens only
    attention = 12 * 2 * T * T * (4 + 16) * B
    expected = 6 * ((gen + disc + heads_rows) * rows + heads_masked * masked) + attention
    assert bench.model_flops(MICRO, B, T) == expected


def _micro_argv(*extra):
    """bench at batch 2 x 16 on the MICRO config, two timed steps, a JSON line at the end."""
    argv = ["bench", "--steps", "2", "--warmup", "1", "--batch", "2", "--seq", "16", "--json", *extra]
    for field, value in MICRO.__dict__.items():
        if not field.endswith("token_id"):
            argv += ["--set", f"{field}={value}"]
    return argv


@pytest.fixture
def restored_backend():
    """main() sets the process's backend; put back the one the other tests run on."""
    previous = backend._active
    yield
    backend._active = previous
    backend._kernel_cache.clear()


def test_bench_command_ends_with_one_json_object(capsys, restored_backend):
    assert main(_micro_argv("--ops")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    for key in ("tokens_per_s", "s_per_step_median", "model_gflop_per_step", "achieved_gflop_per_s",
                "gemm_gflop_per_s", "mfu", "peak_memory_mb", "compile_s"):
        assert result[key] >= 0, key
    assert result["model_gflop_per_step"] == pytest.approx(bench.model_flops(MICRO, 2, 16) / 1e9)
    assert any(line.startswith("attention fwd+bwd") for line in lines)
    assert result["blas"] == backend.blas_library()  # the GEMM rate depends on the BLAS kernels: say which


def test_vs_numpy_times_both_backends_interleaved(capsys, restored_backend):
    pytest.importorskip("numba")
    assert main(_micro_argv("--vs-numpy", "--backend", "numba")) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["vs_numpy"]
    assert result["backend"] == "numba"
    assert result["ratio"] == pytest.approx(result["s_per_step_numpy"] / result["s_per_step_ours"])
    assert result["tokens_per_s_numpy"] == pytest.approx(2 * 16 / result["s_per_step_numpy"])


def test_vs_numpy_needs_the_numba_backend(capsys, restored_backend):
    assert main(_micro_argv("--vs-numpy", "--backend", "numpy")) == 2
    assert "add --backend numba" in capsys.readouterr().err
